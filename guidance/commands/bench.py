"""``guidance bench pipeline|transport|engines``: measured, side-by-side benchmarks with JSON reports."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from guidance.bench_pipeline import PipelineBenchConfig, format_table, run_pipeline_bench, write_json
from guidance.cli import CommandError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks (pipeline, transport, engines)")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)

    p = kinds.add_parser("pipeline", help="simulated stream over loopback OpenIGTLink through the pipeline")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--size", default="256x256", metavar="WxH")
    p.add_argument("--modality", choices=("us", "fluoro"), default="us")
    p.add_argument("--engine", default="auto")
    p.add_argument("--model", default="")
    p.add_argument("--budget-ms", type=float, default=0.0, help="latency budget (default one frame interval)")
    p.add_argument(
        "--slow-ms", type=float, default=0.0, help="add this delay to every inference (budget test)"
    )
    p.add_argument(
        "--step-down",
        default=None,
        metavar="BACKENDS",
        help="engines to step down to when over budget, comma-separated ('' disables; default from settings)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument(
        "--report", type=Path, default=None, metavar="DIR", help="also write PNG plots + index.html here"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="MINUTES",
        help="soak test: run this long (overrides --frames) and report memory and p99 steadiness",
    )
    p.set_defaults(func=run_pipeline)

    # Other benchmark kinds live with the code they measure; each module adds its own parser.
    for module, adder in (
        ("guidance.commands.bench_transport", "add_transport_bench"),
        ("guidance.bench_engines", "add_engines_bench"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        getattr(mod, adder)(kinds)


def run_pipeline(args: argparse.Namespace) -> int:
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise CommandError(f"--size must look like 256x256, got {args.size!r}") from None
    frames = args.frames
    soak_window = 0.0
    if args.duration is not None:
        if args.duration <= 0:
            raise CommandError("--duration must be positive")
        frames = max(1, round(args.duration * 60 * args.fps))
        soak_window = min(300.0, args.duration * 60 / 6)  # first/last 5 minutes (a sixth of shorter runs)
    if frames <= 0:
        raise CommandError("--frames must be positive")
    cfg = PipelineBenchConfig(
        frames=frames,
        fps=args.fps,
        width=w,
        height=h,
        modality=args.modality,
        backend=args.engine,
        model=args.model,
        slow_ms=args.slow_ms,
        budget_ms=args.budget_ms,
        report_dir=args.report,
        step_down=args.step_down,
        soak_window_s=soak_window,
    )
    report = run_pipeline_bench(cfg, progress=sys.stderr.isatty())
    print(format_table(report))
    if "soak" in report:
        print(f"  soak: {report['soak']}")
    if "report_html" in report:
        print(f"report: {report['report_html']}", file=sys.stderr)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
