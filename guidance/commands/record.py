"""``guidance record``: record a live OpenIGTLink stream to a native (MCAP) recording.

The file is readable at any moment (even after the process is killed) up to the last ~0.5 s.
Ends after ``--duration`` seconds, on Ctrl+C or on SIGTERM (closing the file properly).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from types import FrameType

from guidance import __version__
from guidance.cli import CommandError
from guidance.recorder import Recorder
from streaming.frame import Frame
from streaming.igtl import IGTLClient
from streaming.igtl.wire import RawMessage
from streaming.recording import RecordingError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("record", help="record a live OpenIGTLink stream to a recording file")
    p.add_argument("--host", default="127.0.0.1", help="OpenIGTLink server (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18944, help="OpenIGTLink port (default 18944)")
    p.add_argument("--out", type=Path, required=True, help="recording file to create (.mcap)")
    p.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (default: Ctrl+C)"
    )
    p.add_argument("--device", default="", help="record only messages of this device name")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="give up when not connected by then")
    p.add_argument("--max-backlog-mb", type=float, default=256.0, help="lossless queue size before dropping")
    p.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="free-form session/study field stored in the file (repeatable; never logged)",
    )
    p.set_defaults(func=run)


def _say(text: str = "", end: str = "\n") -> None:
    """Progress and summaries go to stderr (stdout stays clean for scripts)."""
    sys.stderr.write(text + end)
    sys.stderr.flush()


def _parse_meta(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--meta must look like KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    if args.duration < 0:
        raise CommandError("--duration must be >= 0")
    out: Path = args.out
    if out.suffix.lower() != ".mcap":
        raise CommandError(f"{out.name}: recordings are MCAP files; name the file *.mcap")
    if out.exists():
        raise CommandError(f"{out} already exists (recordings are never overwritten)")
    if not out.parent.is_dir():
        raise CommandError(f"folder {out.parent} does not exist")
    metadata = {
        "app": "guidance",
        "app_version": __version__,
        "session_id": uuid.uuid4().hex,
        "source": {"host": args.host, "port": args.port, "device": args.device},
        "started_wall_ns": time.time_ns(),
        "study": _parse_meta(args.meta),
    }
    done = threading.Event()
    failure: list[str] = []

    def on_error(reason: str) -> None:
        failure.append(reason)
        done.set()

    recorder = Recorder(out, metadata, max_backlog_mb=args.max_backlog_mb, on_error=on_error)
    device = args.device

    def on_raw(raw: RawMessage) -> None:
        if device and raw.header[14:34].split(b"\0", 1)[0].decode("utf-8", "replace") != device:
            return
        recorder.submit(raw)

    def ignore_frame(frame: Frame) -> None:
        return None

    client = IGTLClient(
        args.host, args.port, on_frame=ignore_frame, on_raw=on_raw, name="guidance-record-client"
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        recorder.start()
    except RecordingError as exc:
        signal.signal(signal.SIGTERM, old_term)
        raise CommandError(str(exc)) from exc
    t0 = time.monotonic()
    try:
        client.start()
        if not client.wait_connected(args.connect_timeout):
            raise CommandError(
                f"cannot connect to {args.host}:{args.port} ({client.stats.last_error or 'timeout'})"
            )
        _say(f"recording {args.host}:{args.port} -> {out}")
        t0 = time.monotonic()
        end = t0 + args.duration if args.duration > 0 else None
        while not done.is_set():
            wait = 1.0 if end is None else min(1.0, end - time.monotonic())
            if wait <= 0:
                break
            try:
                done.wait(wait)  # progress tick on the main thread, not a hot path
            except KeyboardInterrupt:
                break  # Ctrl+C is the normal way to end a recording: close the file, exit 0
            st = recorder.stats()
            _say(
                f"\r{time.monotonic() - t0:7.1f} s  {st.written} messages  {st.bytes / 1e6:8.1f} MB  "
                f"dropped {st.dropped}{'' if client.connected else '  (disconnected)'}",
                end="",
            )
    finally:
        client.stop()
        st = recorder.stop()
        signal.signal(signal.SIGTERM, old_term)
        _say()
    if failure:
        raise CommandError(f"recording failed: {failure[0]} (file readable up to that point)")
    _say(
        f"recorded {st.written} messages ({st.bytes / 1e6:.1f} MB, {st.markers} markers) in "
        f"{time.monotonic() - t0:.1f} s, dropped {st.dropped} -> {out}"
    )
    return 0
