"""``guidance calibrate``: choose a trained model's operating point on validation phantoms and re-export it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="choose a trained model's instrument/target biases and post-processing on validation phantoms",
        description="Runs the trained network (the .pt beside the card) over validation phantom sequences, "
        "sweeps the instrument logit bias against false instrument detections and instrument Dice, then the "
        "target logit bias against target Dice, decides whether the target is kept to its main region, "
        "then re-exports <out>/<name>.onnx and its card.",
    )
    p.add_argument("model", type=Path, help="model card (.json) of a training run, with its .pt beside it")
    p.add_argument("--out", type=Path, required=True, help="folder for the calibrated ONNX, card and .pt")
    p.add_argument("--json", type=Path, default=None, help="also write the sweep report here")
    p.add_argument(
        "--sequences",
        type=int,
        default=None,
        help="validation sequences per modality (default 48, about 9.5 min on 2 CPU cores)",
    )
    p.add_argument(
        "--max-false-detection",
        type=float,
        default=0.02,
        help="largest acceptable false instrument detection rate (default 0.02)",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="average each frame's logits with its left-right mirror image's (two network passes per "
        "frame); the operating point is chosen for, and exported with, that graph",
    )
    p.add_argument(
        "--alternate-mirror",
        action="store_true",
        help="one network pass per frame, the view alternating (as it is, mirrored, ...), and the target "
        "log-odds averaged with the previous frame's; the operating point is chosen for, and exported "
        "with, that graph",
    )
    p.add_argument(
        "--fuse-instrument",
        type=float,
        default=0.0,
        metavar="W",
        help="with --alternate-mirror: fuse the instrument log-odds too, the previous frame weighted W "
        "(0 to below 1; default 0, the frame's own view only). Higher steadies the tip and lags it",
    )
    p.add_argument(
        "--running-target",
        type=float,
        default=None,
        metavar="W",
        help="no sweep: re-export a calibrated single-view card at its own operating point with the target "
        "log-odds a running average over frames, the previous average weighted W (above 0, below 1); "
        "the instrument is left as it was",
    )
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="CARD",
        help="a calibrated model card (e.g. the shipped one): prefer operating points at least as good as "
        "its own on every validation figure (instrument and target Dice, false detections, tip p95), "
        "and say whether there was one",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guidance.cli import CommandError

    try:
        from guidance import calibration
    except ImportError as exc:
        raise CommandError(
            f"calibration needs the 'train' extra (pip install -e '.[train]'): {exc}"
        ) from None
    if args.running_target is not None:
        if args.mirror or args.alternate_mirror or args.reference or args.sequences or args.fuse_instrument:
            raise CommandError(
                "--running-target re-exports a calibrated card without a sweep: it takes no --mirror, "
                "--alternate-mirror, --fuse-instrument, --reference or --sequences"
            )
        try:
            onnx_path, card_path = calibration.with_running_target(args.model, args.out, args.running_target)
        except calibration.CalibrationError as exc:
            raise CommandError(str(exc)) from None
        logger.info(
            "running target %g at the card's own operating point; wrote %s and %s",
            args.running_target,
            onnx_path,
            card_path,
        )
        return 0
    if args.mirror and args.alternate_mirror:
        raise CommandError("--mirror and --alternate-mirror exclude each other: choose one")
    if args.fuse_instrument and not args.alternate_mirror:
        raise CommandError("--fuse-instrument is a setting of --alternate-mirror")
    if not 0.0 <= args.fuse_instrument < 1.0:
        raise CommandError(f"--fuse-instrument must be at least 0 and below 1, got {args.fuse_instrument:g}")
    cfg = calibration.CalibrationConfig(
        max_false_detection=args.max_false_detection,
        mirror=args.mirror,
        alternate=args.alternate_mirror,
        fuse_instrument=args.fuse_instrument,
    )
    if args.sequences is not None:
        cfg = dataclasses.replace(cfg, sequences=args.sequences)
    try:
        reference = None
        if args.reference is not None:
            if not args.reference.is_file():
                raise calibration.CalibrationError(f"{args.reference} not found")
            reference = calibration.reference_row(json.loads(args.reference.read_text(encoding="utf-8")), cfg)
        _, model = calibration.load_run(args.model)
        report = calibration.calibrate(model, cfg, reference)
        onnx_path, card_path = calibration.apply_calibration(args.model, args.out, report)
    except calibration.CalibrationError as exc:
        raise CommandError(str(exc)) from None
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    logger.info(
        "instrument bias %g (%s); target bias %g; single-region target %s%s; wrote %s and %s",
        report["instrument_logit_bias"],
        report["bias_rule"],
        report["target_logit_bias"],
        "on" if report["single_region_target"]["enabled"] else "off",
        "; mirrored" if report.get("mirror") else "; alternating views" if report.get("alternate") else "",
        onnx_path,
        card_path,
    )
    return 0
