"""``guidance export``: convert between native recordings and PLUS/Slicer sequence files.

* ``guidance export RECORDING --mha OUT`` / ``--nrrd OUT``: IMAGE messages of a recording -> a PLUS
  ``.igs.mha`` / ``.igs.nrrd`` (or Slicer ``.seq.nrrd`` when OUT ends so) sequence file;
* ``guidance export SEQFILE --recording OUT``: a PLUS/Slicer sequence file -> a native recording that
  ``guidance replay`` serves at the original timing.

Each output kind is one ``_export_<kind>`` function chosen from :data:`EXPORTERS`; another output (for
example ``--dicom``) is one more option in :func:`register` and one more entry there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from guidance.cli import CommandError
from streaming.recording import RecordingError, recording_to_sequence, sequence_to_recording
from streaming.sequence import SequenceFormatError, sequence_format


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export", help="export a recording to .igs.mha/.igs.nrrd, or import one as a recording"
    )
    p.add_argument("source", type=Path, help="recording (.mcap) or PLUS/Slicer sequence file")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--mha", type=Path, metavar="OUT", help="write a PLUS .igs.mha sequence file")
    out.add_argument("--nrrd", type=Path, metavar="OUT", help="write a PLUS .igs.nrrd (or Slicer .seq.nrrd)")
    out.add_argument("--recording", type=Path, metavar="OUT", help="import a sequence file as a recording")
    out.add_argument(
        "--dicom", type=Path, metavar="DIR", help="write DICOM cine (+ SEG of the AI masks) into DIR"
    )
    p.add_argument("--overlay", action="store_true", help="--dicom: also write a burned-in AI overlay copy")
    p.add_argument("--patient-name", default="", help="--dicom: typed patient name (Family^Given)")
    p.add_argument("--patient-id", default="", help="--dicom: typed patient ID")
    p.add_argument(
        "--engine",
        default=None,
        help="--dicom: segment with this engine when the recording holds no results (default: use recorded results)",
    )
    p.add_argument("--device", default=None, help="IMAGE device to export (default: the first one seen)")
    p.add_argument("--raw", action="store_true", help="do not compress the sequence file")
    p.set_defaults(func=run)


def _export_mha(args: argparse.Namespace) -> str:
    return _to_sequence(args, args.mha, (".mha", ".mhd"))


def _export_nrrd(args: argparse.Namespace) -> str:
    return _to_sequence(args, args.nrrd, (".nrrd",))


def _to_sequence(args: argparse.Namespace, out: Path, suffixes: tuple[str, ...]) -> str:
    if not out.name.lower().endswith(suffixes):
        raise CommandError(f"{out.name}: the output name must end with {' or '.join(suffixes)}")
    n = recording_to_sequence(args.source, out, device=args.device, compress=not args.raw, progress=_progress)
    return f"exported {n} frames -> {out}"


def _export_recording(args: argparse.Namespace) -> str:
    try:
        sequence_format(args.source)
    except SequenceFormatError as exc:
        raise CommandError(str(exc)) from exc
    n = sequence_to_recording(args.source, args.recording, device=args.device or "Image", progress=_progress)
    return f"imported {n} frames -> {args.recording}"


def _export_dicom(args: argparse.Namespace) -> str:
    from engines import registry
    from engines.base import EngineError
    from guidance.dicom.export import ExportOptions, export_dicom
    from guidance.dicom.study import StudyValidationError, manual_entry

    study = None
    if args.patient_name or args.patient_id:  # else the recording's own metadata["study"]
        try:
            study = manual_entry(args.patient_name, args.patient_id)
        except StudyValidationError as exc:
            raise CommandError(str(exc)) from exc
    engine = None
    if args.engine:
        try:
            engine = registry.create(args.engine)
            engine.load()
            engine.warm_up()
        except EngineError as exc:
            raise CommandError(str(exc)) from exc
    try:
        paths = export_dicom(
            args.source,
            args.dicom,
            study,
            engine=engine,
            options=ExportOptions(overlay=args.overlay),
            progress=lambda stage, n: _say(f"\r{stage}: {n}", end=""),
        )
    finally:
        if engine is not None:
            engine.close()
    return f"wrote {len(paths)} DICOM file(s) in {args.dicom}"


#: destination option (argparse dest) -> exporter.
EXPORTERS: dict[str, Callable[[argparse.Namespace], str]] = {
    "mha": _export_mha,
    "nrrd": _export_nrrd,
    "recording": _export_recording,
    "dicom": _export_dicom,
}


def _progress(done: int) -> None:
    if done % 100 == 0:
        _say(f"\r{done} frames", end="")


def _say(text: str = "", end: str = "\n") -> None:
    """Progress and summaries go to stderr (stdout stays clean for scripts)."""
    sys.stderr.write(text + end)
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    if not args.source.is_file():
        raise CommandError(f"{args.source}: no such file")
    for dest, exporter in EXPORTERS.items():
        out = getattr(args, dest, None)
        if out is None:
            continue
        if out.exists():
            raise CommandError(f"{out} already exists")
        try:
            message = exporter(args)
        except (RecordingError, SequenceFormatError, OSError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        _say(f"\n{message}")
        return 0
    raise CommandError("choose an output: --mha, --nrrd or --recording")
