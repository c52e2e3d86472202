"""``guidance demo`` (the app on the built-in simulated stream) and ``guidance live`` (a real peer)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engines.base import EngineError
from guidance.cli import CommandError
from guidance.config import SettingsError, load_settings
from guidance.frontend import FrontendOptions, FrontendUnavailable, load_frontend
from guidance.session import LiveSession


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="open the app on the built-in simulated scanner")
    demo.add_argument(
        "--modality", choices=("us", "fluoro"), default=None, help="phantom modality (default us)"
    )
    demo.add_argument("--fps", type=float, default=None, help="simulated frame rate (default 30)")
    demo.add_argument("--size", default=None, metavar="WxH", help="simulated image size (default 256x256)")
    demo.add_argument("--seed", type=int, default=None)
    _common(demo)
    demo.set_defaults(func=run_demo)

    live = sub.add_parser(
        "live", help="open the app on a live OpenIGTLink source (PlusServer, scanner, replay)"
    )
    live.add_argument(
        "--host", default=None, help="OpenIGTLink server host (default from settings, 127.0.0.1)"
    )
    live.add_argument("--port", type=int, default=None, help="OpenIGTLink server port (default 18944)")
    live.add_argument("--device", default=None, help="only accept IMAGE messages from this device name")
    _common(live)
    live.set_defaults(func=run_live)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", default=None, help="engine backend: auto, onnxruntime, torch, tensorrt, classical"
    )
    p.add_argument("--model", default=None, help="model ONNX path (default: the shipped model)")
    p.add_argument(
        "--budget-ms", type=float, default=None, help="latency budget (default one frame interval)"
    )
    p.add_argument("--frames", type=int, default=None, help="quit after N painted frames")
    p.add_argument("--screenshot", type=Path, default=None, help="save a PNG of the window before quitting")
    p.add_argument("--fullscreen", action="store_true")


def _engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.engine:
        out["backend"] = args.engine
    if args.model:
        out["model"] = args.model
    if args.budget_ms is not None:
        out["budget_ms"] = args.budget_ms
    return out


def _run(args: argparse.Namespace, overrides: dict[str, Any], simulate: bool) -> int:
    try:
        settings = load_settings(overrides=overrides)
        frontend = load_frontend("qt")
    except (SettingsError, FrontendUnavailable) as exc:
        raise CommandError(str(exc)) from exc
    session = LiveSession(settings, simulate=simulate)
    options = FrontendOptions(frames=args.frames, screenshot=args.screenshot, fullscreen=args.fullscreen)
    try:
        return frontend(session, options)
    except (EngineError, OSError) as exc:  # e.g. a named backend missing, a port in use
        raise CommandError(str(exc)) from exc


def run_demo(args: argparse.Namespace) -> int:
    sim: dict[str, Any] = {}
    if args.modality:
        sim["modality"] = args.modality
    if args.fps:
        sim["fps"] = args.fps
    if args.seed is not None:
        sim["seed"] = args.seed
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise CommandError(f"--size must look like 256x256, got {args.size!r}") from None
        sim.update(width=w, height=h)
    return _run(args, {"simulator": sim, "engine": _engine_overrides(args)}, simulate=True)


def run_live(args: argparse.Namespace) -> int:
    stream: dict[str, Any] = {}
    if args.host:
        stream["host"] = args.host
    if args.port:
        stream["port"] = args.port
    if args.device:
        stream["device_filter"] = args.device
    return _run(args, {"stream": stream, "engine": _engine_overrides(args)}, simulate=False)
