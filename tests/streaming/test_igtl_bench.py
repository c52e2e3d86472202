"""The transport benchmark runs end to end (tiny run; figures are not asserted: speed is for benchmarks)."""

from __future__ import annotations

import math

from guidance.commands.bench_transport import format_table, histogram_summary
from streaming.igtl.bench import run_transport_bench


def test_igtl_bench_smoke_rows() -> None:
    report = run_transport_bench(
        ["256x256"], fps=30.0, seconds=0.2, impls=["guidance"], summarize=histogram_summary
    )
    (row,) = report["transport"]
    assert {"size", "impl", "p50_ms", "p99_ms", "max_ms", "dropped", "cpu_s_per_frame"} <= set(row)
    assert row["impl"] == "guidance"
    assert row["received"] == row["sent"] - row["dropped"]
    assert row["received"] > 0
    assert not math.isnan(row["p50_ms"])
    assert "256x256" in format_table(report["transport"])
