"""``guidance bench engines``: every available backend side by side against torch eager, per input size.

The lead's ``bench`` command calls :func:`add_engines_bench` with its subparsers and dispatches to
:func:`run_engines_bench`. Engines run interleaved (one frame each, round-robin, rotating the order every
iteration) so machine load affects all of them alike; each engine's ``infer`` (preprocess + network +
argmax + resize back) is timed into a :class:`guidance.latency.LatencyHistogram`. The baseline is torch eager
fp32 (no channels-last, no CUDA graph, no FP16) on the same device as the torch backend; the ratio column is
``baseline p50 / backend p50`` (> 1: faster than eager). OpenMP threads are made to sleep when idle
(:func:`passive_openmp`) so that torch's spinning workers do not take the cores from the next engine.

Models: the shipped model at its own input size; for other sizes (or when none is shipped) a randomly
initialised network of the same family is exported at that size (recorded per row as ``model``).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.base import EngineError, SegmentationEngine
from guidance.latency import LatencyHistogram

logger = logging.getLogger(__name__)

BASELINE = "torch-eager"


def add_engines_bench(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "engines", help="latency of every available inference backend vs torch eager"
    )
    p.add_argument("--json", required=True, type=Path, help="write the results here (JSON)")
    p.add_argument("--report", type=Path, default=None, help="folder for PNG plots + a one-page HTML summary")
    p.add_argument("--sizes", default="256,512", help="network input sizes (square), comma separated")
    p.add_argument("--iterations", type=int, default=100, help="timed frames per engine and size")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames per engine and size")
    p.add_argument(
        "--model", default=None, help="model card/ONNX path or name (default: shipped, else random)"
    )
    p.add_argument("--backends", default="", help="comma-separated subset (default: every available one)")
    p.add_argument(
        "--versus",
        default=None,
        help="a second model card, run on onnxruntime in the same interleaved loop (row "
        "'onnxruntime:versus'), e.g. a candidate against the shipped model",
    )
    p.add_argument("--tiny", action="store_true", help="use the tiny random network (quick smoke runs)")
    p.add_argument(
        "--omp-active",
        action="store_true",
        help="leave OpenMP's default busy-wait (by default the bench makes torch's threads sleep when idle)",
    )
    p.set_defaults(func=run_engines_bench)
    return p


@dataclass(frozen=True, slots=True)
class BenchRow:
    size: int
    backend: str
    label: str
    device: str
    precision: str
    model: str
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    fps: float
    vs_torch_eager: float | None


def _frames(size: int, n: int = 4) -> list[npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for i in range(n):
        img = 70 + 30 * np.sin(xx / (7 + i)) * np.cos(yy / 11) + rng.normal(0, 12, (size, size))
        img += 120 * (np.abs((yy - 0.3 * size) - (0.4 + 0.05 * i) * (xx - 0.2 * size)) < 1.5)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _model_for(size: int, args: argparse.Namespace, tmp: Path) -> Path:
    from engines.assets import ModelAssetError, load_model_card, make_random_model, resolve_model

    if not args.tiny:
        try:
            card = load_model_card(resolve_model(args.model))
            if card.input_hw == (size, size):
                return card.card_path
        except ModelAssetError as exc:
            if args.model:
                raise
            logger.info("No shipped model (%s); benchmarking a random-init network", exc)
    print(f"exporting a random-init network at {size}x{size} ...", file=sys.stderr)
    return make_random_model(tmp, size, size, tiny=bool(args.tiny))


VERSUS = "onnxruntime:versus"


def _engines(
    model: Path, wanted: set[str], versus: Path | None = None
) -> tuple[dict[str, SegmentationEngine], list[str]]:
    from engines import registry
    from engines.backends.torch_backend import TorchEngine, probe_cuda

    engines: dict[str, SegmentationEngine] = {}
    errors: list[str] = []
    for status in registry.backends():
        if wanted and status.name not in wanted:
            continue
        if not status.available:
            errors.append(f"{status.name}: {status.reason}")
            continue
        try:
            eng = (
                registry.create(status.name)
                if status.name == "classical"
                else registry.create(status.name, model=model)
            )
            eng.load()
            engines[status.name] = eng
        except EngineError as exc:
            errors.append(f"{status.name}: {exc}")
    if "torch" in engines or not wanted or BASELINE in wanted:
        try:
            base = TorchEngine(model, device="cuda" if probe_cuda() is None else "cpu", optimize=False)
            base.load()
            engines[BASELINE] = base
        except EngineError as exc:
            errors.append(f"{BASELINE}: {exc}")
    if versus is not None:
        try:
            other = registry.create("onnxruntime", model=versus)
            other.load()
            engines[VERSUS] = other
        except EngineError as exc:
            errors.append(f"{VERSUS}: {exc}")
    return engines, errors


def _versus_for(size: int, ref: str | None) -> Path | None:
    """The ``--versus`` model's card when its input is ``size`` square (else None: nothing to compare)."""
    if not ref:
        return None
    from engines.assets import load_model_card, resolve_model

    card = load_model_card(resolve_model(ref))
    return card.card_path if card.input_hw == (size, size) else None


def bench_size(size: int, model: Path, args: argparse.Namespace) -> tuple[list[BenchRow], list[str]]:
    wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
    versus = _versus_for(size, getattr(args, "versus", None))
    engines, errors = _engines(model, wanted, versus)
    frames = _frames(size)
    hists = {name: LatencyHistogram(name) for name in engines}
    names = list(engines)
    try:
        # warm_up() ends with a reset; the frames then form one looping stream per engine, so a temporal
        # model's difference channel is computed (and timed) on every frame.
        for eng in engines.values():
            eng.warm_up()
        for it in range(args.warmup + args.iterations):
            k = it % len(names)
            for name in names[k:] + names[:k]:
                frame = frames[it % len(frames)]
                t0 = time.perf_counter_ns()
                engines[name].infer(frame)
                dt = time.perf_counter_ns() - t0
                if it >= args.warmup:
                    hists[name].record_ns(dt)
        base = hists.get(BASELINE)
        base_p50 = base.percentile_ms(50) if base is not None and base.count else None
        rows = []
        for name, eng in engines.items():
            h = hists[name]
            info = eng.describe()
            p50 = h.percentile_ms(50)
            rows.append(
                BenchRow(
                    size=size,
                    backend=name,
                    label=info.label()
                    if name != BASELINE
                    else f"torch eager ({info.device}, {info.precision})",
                    device=info.device,
                    precision=info.precision,
                    model=info.model,
                    count=h.count,
                    p50_ms=round(p50, 3),
                    p90_ms=round(h.percentile_ms(90), 3),
                    p99_ms=round(h.percentile_ms(99), 3),
                    max_ms=round(h.max_ms, 3),
                    mean_ms=round(h.mean_ms, 3),
                    fps=round(1000.0 / h.mean_ms, 1) if h.mean_ms > 0 else 0.0,
                    vs_torch_eager=round(base_p50 / p50, 2) if base_p50 and p50 > 0 else None,
                )
            )
        return rows, errors
    finally:
        for eng in engines.values():
            eng.close()


def format_table(rows: list[BenchRow]) -> str:
    head = (
        f"{'size':>5} {'backend':<18} {'device':<26} {'prec':<5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'fps':>7} {'vs eager':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.vs_torch_eager:.2f}x" if r.vs_torch_eager else "-"
        lines.append(
            f"{r.size:>5} {r.backend:<18} {r.device[:26]:<26} {r.precision:<5} {r.p50_ms:>8.2f} "
            f"{r.p99_ms:>8.2f} {r.max_ms:>8.2f} {r.fps:>7.1f} {ratio:>8}"
        )
    return "\n".join(lines)


def write_report(directory: Path, rows: list[BenchRow], meta: dict[str, Any]) -> Path:
    """PNG bar charts (p50/p99 per backend and size) + a one-page HTML summary; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r.size for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        sub = [r for r in rows if r.size == size]
        x = np.arange(len(sub))
        ax.bar(x - 0.2, [r.p50_ms for r in sub], 0.4, label="p50")
        ax.bar(x + 0.2, [r.p99_ms for r in sub], 0.4, label="p99")
        ax.set_xticks(x, [r.backend for r in sub], rotation=20)
        ax.set_ylabel("ms per frame (preprocess + inference + resize back)")
        ax.set_title(f"{size}x{size}")
        ax.legend()
    fig.tight_layout()
    png = directory / "engines_latency.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    cols = [
        "size",
        "backend",
        "device",
        "precision",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "fps",
        "vs_torch_eager",
        "model",
    ]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(asdict(r)[c]))}</td>" for c in cols) + "</tr>" for r in rows
    )
    errors = "".join(f"<li>{html.escape(e)}</li>" for e in meta.get("unavailable", []))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>guidance engine benchmark</title>
<style>body{{font-family:sans-serif;margin:2em}}
td,th{{padding:2px 8px;border-bottom:1px solid #ccc}}</style></head>
<body><h1>Inference engines</h1>
<p>{html.escape(meta.get("host", ""))} &middot; {meta.get("iterations")} frames per engine and size,
interleaved; ratio = torch eager p50 / backend p50.</p>
<table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{body}</table>
<p><img src="{png.name}" alt="latency per backend"></p>
<h2>Not benchmarked</h2><ul>{errors or "<li>none</li>"}</ul></body></html>"""
    out = directory / "engines.html"
    out.write_text(page, encoding="utf-8")
    return out


def passive_openmp(keep_default: bool) -> str:
    """Make OpenMP worker threads sleep, not spin, between parallel regions (before torch loads).

    torch's OpenMP workers busy-wait after every operator. Interleaved with them, the next engine found
    both cores taken by spinning threads: onnxruntime ``infer`` measured p50 10.1 ms right after a torch
    call against 8.0 ms after another onnxruntime call (8.4 ms with passive OpenMP). No engine should pay
    for another's idle spinning, so the bench sets ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set a
    policy (or passed ``--omp-active``); the policy in force is recorded in the report. Torch eager's own
    p50 at 256x256 measured 59-72 ms passive and 55-68 ms active across runs here (the run-to-run noise
    is as large as any difference); ``--omp-active`` gives the other view.
    """
    if keep_default or "OMP_WAIT_POLICY" in os.environ:
        return os.environ.get("OMP_WAIT_POLICY", "default (active spin)")
    if "torch" in sys.modules:
        logger.warning("torch was imported before the bench set OMP_WAIT_POLICY; its threads may spin")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def run_engines_bench(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    omp_policy = passive_openmp(bool(getattr(args, "omp_active", False)))
    rows: list[BenchRow] = []
    unavailable: list[str] = []
    with tempfile.TemporaryDirectory(prefix="guidance-bench-") as tmp:
        for size in sizes:
            model = _model_for(size, args, Path(tmp))
            print(f"benchmarking {size}x{size} ({args.iterations} frames per engine) ...", file=sys.stderr)
            size_rows, errors = bench_size(size, model, args)
            rows.extend(size_rows)
            unavailable.extend(e for e in errors if e not in unavailable)
    meta: dict[str, Any] = {
        "host": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "iterations": args.iterations,
        "warmup": args.warmup,
        "omp_wait_policy": omp_policy,
        "unavailable": unavailable,
    }
    print(format_table(rows))
    for e in unavailable:
        print(f"not benchmarked: {e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in rows]}, indent=2), encoding="utf-8"
    )
    if args.report is not None:
        page = write_report(args.report, rows, meta)
        print(f"report: {page}")
    return 0 if rows else 1
