"""The benchmark entry points run end to end on tiny sizes (figures are reported by the benchmarks)."""

from __future__ import annotations

import math

from guidance.recorder import bench_record
from streaming.replay import bench_replay


def test_rec_bench_record_runs() -> None:
    out = bench_record(width=64, height=48, fps=100.0, seconds=0.3)
    assert out["frames"] == 30
    assert out["written"] == 30
    assert out["dropped"] == 0
    assert out["errors"] == 0
    assert out["fps_in"] > 0
    assert out["fps_written"] > 0


def test_replay_bench_runs() -> None:
    out = bench_replay(frames=10, fps=100.0, width=32, height=24)
    assert out["sent"] == 10
    assert out["received"] == 10
    assert math.isfinite(out["timing_error_p99_ms"])
    assert math.isfinite(out["latency_p99_ms"])
