"""``guidance simulate``: write a phantom sequence as a recording the replay server can stream, plus truth.

The recording and the ``.truth.npz`` sidecar are described in :mod:`guidance.phantoms.export`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from guidance.cli import CommandError
from guidance.phantoms.export import write_recording
from streaming.recording import RecordingError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate", help="write a phantom sequence as a replayable recording plus a ground-truth .npz"
    )
    p.add_argument("--modality", choices=("us", "fluoro"), default="us", help="phantom (default us)")
    p.add_argument("--frames", type=int, required=True, help="number of frames")
    p.add_argument("--out", type=Path, required=True, help="recording file to create (.mcap)")
    p.add_argument("--seed", type=int, default=0, help="sequence seed (default 0)")
    p.add_argument("--fps", type=float, default=None, help="frame rate (default 30 us, 15 fluoro)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="fluoro only")
    p.add_argument("--no-truth", action="store_true", help="do not write the .truth.npz sidecar")
    p.set_defaults(func=run)


def _progress(done: int, total: int) -> None:
    if done % 50 == 0 or done == total:
        sys.stderr.write(f"\rsimulate: frame {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        sidecar = write_recording(
            args.out,
            modality=args.modality,
            frames=args.frames,
            seed=args.seed,
            fps=args.fps,
            width=args.width,
            height=args.height,
            bit_depth=args.bit_depth,
            write_truth=not args.no_truth,
            progress=_progress,
        )
    except (ValueError, FileExistsError, RecordingError) as exc:
        raise CommandError(str(exc)) from exc
    extra = f" and {sidecar}" if sidecar is not None else ""
    sys.stderr.write(
        f"simulate: wrote {args.frames} {args.modality} frames to {args.out}{extra} "
        f"in {time.perf_counter() - t0:.1f} s\n"
    )
    return 0
