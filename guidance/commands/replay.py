"""``guidance replay FILE``: serve a recording or a PLUS/Slicer sequence file over OpenIGTLink.

Waits for the first client, then sends at original timing (``--rate`` factor, or ``--max-speed``),
optionally looping, with each header stamped at the actual send time. Ctrl+C or SIGTERM stops.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from guidance.cli import CommandError
from streaming.replay import ReplayError, ReplayServer


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replay", help="replay a recording or .igs.mha/.igs.nrrd/.seq.nrrd over OpenIGTLink")
    p.add_argument("file", type=Path, help="recording (.mcap) or PLUS/Slicer sequence file")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18944, help="TCP port (default 18944; 0 = any free port)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--rate", type=float, default=1.0, help="speed factor (2 = twice as fast)")
    speed.add_argument("--max-speed", action="store_true", help="send as fast as possible, ignoring timing")
    p.add_argument("--loop", action="store_true", help="start over at the end")
    p.add_argument("--device", default="Image", help="device name for sequence-file frames (default Image)")
    p.set_defaults(func=run)


def _say(text: str = "", end: str = "\n") -> None:
    """Progress and summaries go to stderr (stdout stays clean for scripts)."""
    sys.stderr.write(text + end)
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    if not args.rate > 0:
        raise CommandError("--rate must be > 0")
    server = ReplayServer(
        args.file,
        port=args.port,
        host=args.host,
        rate=args.rate,
        max_speed=args.max_speed,
        loop=args.loop,
        device=args.device,
    )
    try:
        server.start()
    except (ReplayError, OSError) as exc:
        raise CommandError(str(exc)) from exc
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    old_term = signal.signal(signal.SIGTERM, on_signal)
    _say(f"replaying {args.file.name} on {args.host}:{server.port}; waiting for a client")
    try:
        while not done.is_set() and not server.wait(1.0):  # progress tick, main thread
            st = server.stats()
            _say(
                f"\rsent {st.sent}  clients {st.clients}  loops {st.loops}  "
                f"timing error p50 {st.timing_error_p50_ms:.3f} ms  p99 {st.timing_error_p99_ms:.3f} ms",
                end="",
            )
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, old_term)
    st = server.stats()
    _say(
        f"\nsent {st.sent} messages ({st.bytes_sent / 1e6:.1f} MB), timing error "
        f"p50 {st.timing_error_p50_ms:.3f} ms p99 {st.timing_error_p99_ms:.3f} ms "
        f"max {st.timing_error_max_ms:.3f} ms"
    )
    if st.error:
        raise CommandError(f"replay failed: {st.error}")
    return 0
