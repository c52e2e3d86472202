"""``guidance bench transport``: our OpenIGTLink client vs pyigtl's, side by side, at 30 fps.

The measurement itself lives in :mod:`streaming.igtl.bench` (it needs no ``guidance`` code); this glue
adds the command line, summarises latencies with :class:`guidance.latency.LatencyHistogram` (the same
HDR-style histogram as the pipeline report), prints a table and writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guidance.latency import LatencyHistogram
from guidance.recorder import bench_record
from streaming.igtl.bench import IMPLS, SIZES, run_transport_bench
from streaming.replay import bench_replay

logger = logging.getLogger(__name__)

_COLUMNS = ("size", "impl", "p50_ms", "p99_ms", "max_ms", "dropped", "cpu_s_per_frame")


def add_transport_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("transport", help="OpenIGTLink receive latency/CPU: ours vs pyigtl on loopback")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), metavar="SIZE")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS), metavar="IMPL")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=5.0, help="sending time per size and implementation")
    p.add_argument(
        "--json", type=Path, default=None, help="write the report (transport, replay_jitter_ms, record)"
    )
    p.add_argument(
        "--replay-frames", type=int, default=300, help="frames for the replay timing test (0: skip)"
    )
    p.add_argument("--record-seconds", type=float, default=5.0, help="1024x768 at 60 fps recording (0: skip)")
    p.set_defaults(func=run)


def histogram_summary(latencies_ns: Sequence[int]) -> dict[str, float]:
    """p50/p99/max (ms) through the product's LatencyHistogram (≤1 % bucket error, exact max)."""
    h = LatencyHistogram("transport")
    for v in latencies_ns:
        h.record_ns(v)
    return {"p50_ms": h.percentile_ms(50.0), "p99_ms": h.percentile_ms(99.0), "max_ms": h.max_ms}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.6f}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["  ".join(f"{c:>15}" for c in _COLUMNS)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['size']:>15}  {r['impl']:>15}  error: {r['error']}")
        else:
            lines.append("  ".join(f"{_fmt(r.get(c)):>15}" for c in _COLUMNS))
    return "\n".join(lines)


def _progress(msg: str) -> None:
    sys.stderr.write(f"bench transport: {msg}\n")


def run(args: argparse.Namespace) -> int:
    if args.fps <= 0 or args.seconds <= 0:
        from guidance.cli import CommandError

        raise CommandError("--fps and --seconds must be positive")
    report = run_transport_bench(
        args.sizes,
        fps=args.fps,
        seconds=args.seconds,
        impls=args.impls,
        summarize=histogram_summary,
        progress=_progress,
    )
    sys.stdout.write(format_table(report["transport"]) + "\n")
    if args.replay_frames > 0:
        _progress(f"replay timing: {args.replay_frames} frames 640x480 at 30 fps")
        rp = bench_replay(frames=args.replay_frames, fps=30.0, width=640, height=480)
        report["replay_jitter_ms"] = {
            "p50": rp["timing_error_p50_ms"],
            "p99": rp["timing_error_p99_ms"],
            "max": rp["timing_error_max_ms"],
            "frames": rp["sent"],
        }
        sys.stdout.write(
            "replay send-timing error (actual - scheduled): "
            f"p50 {rp['timing_error_p50_ms']:.3f} ms, p99 {rp['timing_error_p99_ms']:.3f} ms, "
            f"max {rp['timing_error_max_ms']:.3f} ms\n"
        )
    if args.record_seconds > 0:
        _progress(f"recording: 1024x768 at 60 fps for {args.record_seconds:g} s")
        rec = bench_record(width=1024, height=768, fps=60.0, seconds=args.record_seconds)
        report["record"] = {
            "fps_in": rec["fps_in"],
            "fps_written": rec["fps_written"],
            "dropped": int(rec["dropped"]),
            "frames": int(rec["frames"]),
            "written": int(rec["written"]),
            "mb_per_s": rec["mb_per_s"],
        }
        sys.stdout.write(
            f"recording 1024x768 @60 fps: in {rec['fps_in']:.1f} fps, written {int(rec['written'])} of "
            f"{int(rec['frames'])}, dropped {int(rec['dropped'])}, {rec['mb_per_s']:.0f} MB/s\n"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, allow_nan=True), encoding="utf-8")
        sys.stderr.write(f"wrote {args.json}\n")
    return 0
