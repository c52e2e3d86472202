"""The transport benchmark runs end to end (tiny run; figures are not asserted: speed is for benchmarks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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


def test_igtl_bench_cli_writes_all_report_keys(tmp_path: Path) -> None:
    """`guidance bench transport --json` holds the issue's keys: transport rows, replay jitter, recording."""
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidance",
            "bench",
            "transport",
            "--sizes",
            "256x256",
            "--impls",
            "guidance",
            "--seconds",
            "0.3",
            "--replay-frames",
            "20",
            "--record-seconds",
            "0.5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {"size", "impl", "p50_ms", "p99_ms", "max_ms", "dropped"} <= set(data["transport"][0])
    assert set(data["replay_jitter_ms"]) >= {"p50", "p99", "max"}
    assert set(data["record"]) >= {"fps_in", "fps_written", "dropped"}
    assert data["record"]["written"] + data["record"]["dropped"] == data["record"]["frames"]
