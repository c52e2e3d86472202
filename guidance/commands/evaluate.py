"""``guidance evaluate``: model vs classical baseline on held-out phantoms and real PLUS recordings."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: The held-out acceptance set's size (guidance.evaluation.EvalConfig's defaults); a model card's figures
#: come from exactly this set.
ACCEPTANCE_SEQUENCES = 192
ACCEPTANCE_FRAMES = 30
DEVELOPMENT_SEQUENCES = 32
#: ``guidance.evaluation.SCENARIOS``' names, spelled out so that ``--help`` does not import the evaluation.
SCENARIO_NAMES = ("heldout", "further-validation", "low-dose-vessels")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a segmentation model against the classical baseline",
        description="Dice per class, tip error (mm), axis angle error and false instrument detections on "
        "held-out phantom sequences (never used in training), per modality, for the model and the classical "
        "baseline side by side; plus false detections on the real PLUS recordings.",
    )
    p.add_argument("--model", default=None, help="model card / ONNX path or shipped name (default: shipped)")
    p.add_argument("--engine", default="onnxruntime", help="backend running the model (default onnxruntime)")
    p.add_argument("--baseline", default="classical", help="baseline engine ('' for none)")
    p.add_argument("--json", type=Path, required=True, help="write the JSON report here")
    p.add_argument("--modality", choices=("us", "fluoro", "both"), default="both")
    p.add_argument(
        "--sequences",
        type=int,
        default=None,
        help=f"sequences per modality (default {ACCEPTANCE_SEQUENCES} for the held-out set, about 3 min, "
        f"and {DEVELOPMENT_SEQUENCES} for a development set; --update-card takes only the former)",
    )
    p.add_argument("--frames", type=int, default=30, help="frames per sequence (default 30)")
    p.add_argument(
        "--plus-dir", type=Path, default=None, help="folder of PLUS recordings (default shared data)"
    )
    p.add_argument("--no-plus", action="store_true", help="skip the real PLUS recordings")
    p.add_argument(
        "--scenario",
        choices=SCENARIO_NAMES,
        default="heldout",
        help="which sequences: the held-out acceptance set (default), or a development set, never written "
        "into a card and without the PLUS recordings: further-validation (96 validation sequences past "
        "calibration's 48, a fresh comparison of models chosen there) or low-dose-vessels (fluoroscopy "
        "only, one failure mode)",
    )
    p.add_argument("--update-card", type=Path, default=None, help="write the figures into this model card")
    p.add_argument(
        "--grid", type=Path, default=None, help="also draw a PNG grid of predicted vs true contours"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.base import EngineError
    from guidance import evaluation
    from guidance.cli import CommandError

    scenario = evaluation.SCENARIOS[args.scenario]
    modalities: tuple[str, ...] = ("us", "fluoro") if args.modality == "both" else (args.modality,)
    if scenario.modalities is not None:
        modalities = tuple(m for m in modalities if m in scenario.modalities) or scenario.modalities
    plus_dir = None if args.no_plus or not scenario.for_card else (args.plus_dir or evaluation.PLUS_DIR)
    if args.update_card is not None and not scenario.for_card:
        raise CommandError(f"--update-card takes held-out figures only, not the {scenario.name} set")
    default = ACCEPTANCE_SEQUENCES if scenario.for_card else DEVELOPMENT_SEQUENCES
    sequences = default if args.sequences is None else args.sequences
    if args.update_card is not None and (sequences, args.frames) != (ACCEPTANCE_SEQUENCES, ACCEPTANCE_FRAMES):
        raise CommandError(
            f"--update-card takes the whole held-out set only ({ACCEPTANCE_SEQUENCES} sequences of "
            f"{ACCEPTANCE_FRAMES} frames), not {sequences} of {args.frames}"
        )
    cfg = evaluation.EvalConfig(
        modalities=modalities,
        sequences=sequences,
        frames=args.frames,
        plus_dir=plus_dir,
        scenario=scenario.name,
    )
    try:
        report = evaluation.evaluate(
            args.model, cfg, model_engine=args.engine, baseline=args.baseline or None
        )
    except (evaluation.EvaluationError, EngineError) as exc:
        raise CommandError(str(exc)) from None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.update_card is not None:
        evaluation.attach_evaluation(args.update_card, report)
    if args.grid is not None:
        factory = evaluation.registry_engine_factory(
            args.engine, **({"model": args.model} if args.model else {})
        )
        previous = evaluation.heldout_predecessors(cfg, args.model)
        evaluation.contour_grid(factory, evaluation.heldout_sequences(cfg), args.grid, previous=previous)
    for line in evaluation.summary_lines(report):
        sys.stderr.write(line + "\n")
    sys.stderr.write(f"report written to {args.json}\n")
    return 0
