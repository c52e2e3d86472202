"""``guidance engines``: list inference backends and devices (and why any is unavailable);
``guidance engines build``: prebuild the TensorRT engine, or say why it cannot."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)


def _say(line: str = "", *, err: bool = False, end: str = "\n") -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(line + end)
    stream.flush()


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("engines", help="list inference backends/devices; build TensorRT engines")
    p.set_defaults(func=run_list)
    sub = p.add_subparsers(dest="engines_action", metavar="ACTION")
    ls = sub.add_parser("list", help="backends, devices and the default model (the default action)")
    ls.set_defaults(func=run_list)
    b = sub.add_parser("build", help="prebuild (or find in the cache) the TensorRT engine for a model")
    b.add_argument(
        "--model", default=None, help="model card/ONNX path or shipped model name (default: shipped)"
    )
    b.add_argument(
        "--precision",
        choices=("auto", "fp16", "fp32"),
        default="auto",
        help="auto: FP16, falling back to FP32 if it fails the golden check",
    )
    b.add_argument(
        "--cache-dir", default=None, help="engine cache folder (default: $GUIDANCE_ENGINE_CACHE or ~/.cache)"
    )
    b.set_defaults(func=run_build)


def _devices() -> list[str]:
    out = [f"cpu: {os.cpu_count()} logical cores"]
    from engines.backends import onnxruntime_backend, tensorrt_backend, torch_backend

    if onnxruntime_backend.probe() is None:
        out.append("onnxruntime providers: " + ", ".join(onnxruntime_backend.providers_available()))
    reason = torch_backend.probe_cuda()
    if reason is None:
        import torch

        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            out.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm{major}{minor}) via torch")
    else:
        out.append(f"torch CUDA: unavailable ({reason})")
    trt_reason = tensorrt_backend.probe()
    out.append("tensorrt: " + ("available" if trt_reason is None else f"unavailable ({trt_reason})"))
    return out


def run_list(args: argparse.Namespace) -> int:
    from engines.assets import ModelAssetError, load_model_card, resolve_model
    from engines.base import EngineUnavailable
    from engines.registry import backends, resolve

    _say("Backends (highest priority first):")
    for s in backends():
        state = "available" if s.available else f"unavailable: {s.reason}"
        _say(f"  {s.name:<12} priority {s.priority:>3}  {state}")
        if s.description:
            _say(f"  {'':<12} {s.description}")
    try:
        _say(f"auto -> {resolve('auto')}")
    except EngineUnavailable as exc:
        _say(f"auto -> none ({exc})")
    _say("Devices:")
    for line in _devices():
        _say(f"  {line}")
    try:
        card = load_model_card(resolve_model(None))
        _say(f"Default model: {card.label} ({card.input_hw[1]}x{card.input_hw[0]}) {card.onnx_path}")
    except ModelAssetError as exc:
        _say(f"Default model: none ({exc})")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from engines.backends import tensorrt_backend
    from engines.base import EngineError
    from engines.trt_cache import EngineCache
    from guidance.cli import CommandError

    reason = tensorrt_backend.probe()
    if reason is not None:
        raise CommandError(f"cannot build a TensorRT engine: {reason}")
    precisions = ("fp16", "fp32") if args.precision == "auto" else (args.precision,)
    cache = EngineCache(args.cache_dir) if args.cache_dir else EngineCache()
    last = [""]

    def progress(status: tensorrt_backend.BuildStatus) -> None:
        line = f"{status.state} {status.phase} {status.progress:.0%}"
        if line != last[0]:
            last[0] = line
            _say(f"\rbuilding TensorRT engine: {line:<60}", err=True, end="")

    try:
        job = tensorrt_backend.start_background_build(args.model, cache, precisions)
    except EngineError as exc:
        raise CommandError(str(exc)) from exc
    job.subscribe(progress)
    try:
        status = job.wait()
    except KeyboardInterrupt:
        job.stop()
        raise
    finally:
        job.stop()
    _say(err=True)
    if status.state != "ready":
        raise CommandError(f"TensorRT build {status.state}: {status.message}")
    _say(f"TensorRT engine ({status.precision}): {status.engine_path}")
    return 0
