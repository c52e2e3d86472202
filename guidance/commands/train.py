"""``guidance train``: train the segmentation network on the phantoms and export ONNX + model card."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is optional (the train extra): imported when the command runs
    from guidance.training import TrainConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the segmentation model on simulated phantoms (needs the 'train' extra)",
        description="Train the needle/target segmentation network on procedurally simulated phantom "
        "sequences, then export <out>/<name>.onnx, <name>.json (model card) and <name>.pt.",
    )
    p.add_argument(
        "--modality", choices=("us", "fluoro", "both"), default="both", help="phantoms to train on"
    )
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget (default 40)")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder (default runs/train)")
    p.add_argument("--name", default="guidance-unet", help="model name (file stem)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--crop", type=int, default=None, help="training crop size in pixels (multiple of 16)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu (default), cuda, cuda:N, or auto (CUDA when torch sees a GPU); phantoms are made on the CPU",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="fp32 (default), or bf16: the forward pass under bfloat16 autocast, about 1.4x the steps on a "
        "CPU with AVX512-BF16 (refused where the device has no native bf16)",
    )
    p.add_argument("--init", default=None, help="start from this state_dict (.pt), e.g. to fine-tune")
    p.add_argument(
        "--target-weight", type=float, default=None, help="weight of the target's CE and Dice terms"
    )
    p.add_argument(
        "--crop-on-target", type=float, default=None, help="fraction of crops centred on the target"
    )
    p.add_argument(
        "--hard-negative",
        type=float,
        default=None,
        help="fraction of ultrasound sequences forced to carry bone or needle-like distractor lines",
    )
    p.add_argument(
        "--fluoro-hard-negative",
        type=float,
        default=None,
        help="fraction of fluoroscopy sequences forced to low dose with opaque vessels",
    )
    p.add_argument(
        "--point-reflectors",
        type=float,
        default=None,
        help="fraction of ultrasound sequences given wire / calcification point reflectors",
    )
    p.add_argument(
        "--curved-walls",
        type=float,
        default=None,
        help="fraction of ultrasound sequences given curved specular walls (cavities, bowls) without a shadow",
    )
    p.add_argument(
        "--bath-lines",
        action="store_true",
        default=None,
        help="give half of the water-bath sequences straight line reflectors that do not reach the border",
    )
    p.add_argument(
        "--presence-head",
        action="store_true",
        default=None,
        help="add the per-frame instrument-presence head (calibration then sets the gate it drives)",
    )
    p.add_argument(
        "--freeze-body",
        action="store_true",
        default=None,
        help="train only what the --init weights lack (a new presence head); keep the rest as loaded",
    )
    p.add_argument(
        "--temporal",
        action="store_true",
        default=None,
        help="a second input channel: the current frame minus the previous one (single-frame --init "
        "weights load with that channel's weights at zero)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="distil from these trained weights (.pt, same architecture), run frozen with their left-right "
        "mirror averaged in: the student is pulled towards the mirrored view's per-pixel class distribution",
    )
    p.add_argument(
        "--distill-weight", type=float, default=None, help="weight of the distillation term (default 1)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guidance.cli import CommandError

    try:
        from guidance import training
    except ImportError as exc:
        raise CommandError(f"training needs the 'train' extra (pip install -e '.[train]'): {exc}") from None

    cfg = train_config(args, training.TrainConfig())
    try:
        result = training.train(cfg, args.out, progress=not args.no_progress, name=args.name)
    except training.TrainingError as exc:
        raise CommandError(str(exc)) from None
    best = result.best_metrics
    logger.info("Trained %d steps in %.0f s", result.steps, result.seconds)
    import sys

    sys.stderr.write(
        f"trained {result.steps} steps in {result.seconds:.0f} s on {', '.join(result.modalities)}; "
        f"validation instrument Dice {best.get('val_instrument_dice', float('nan')):.3f}, "
        f"target Dice {best.get('val_target_dice', float('nan')):.3f}; model in {args.out}\n"
    )
    return 0


def train_config(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """The run's ``TrainConfig``: ``base`` with the options given on the command line (unset ones kept)."""
    modalities = ("us", "fluoro") if args.modality == "both" else (args.modality,)
    overrides = {
        k: v
        for k, v in {
            "batch_size": args.batch_size,
            "crop": args.crop,
            "lr": args.lr,
            "threads": args.threads,
            "device": args.device,
            "precision": args.precision,
            "init_weights": args.init,
            "target_ce_weight": args.target_weight,
            "target_dice_weight": args.target_weight,
            "crop_on_target": args.crop_on_target,
            "hard_negative_fraction": args.hard_negative,
            "fluoro_hard_negative_fraction": args.fluoro_hard_negative,
            "point_reflector_fraction": args.point_reflectors,
            "curved_wall_fraction": args.curved_walls,
            "bath_lines": args.bath_lines,
            "freeze_body": args.freeze_body,
            "teacher_weights": args.teacher,
            "w_distill": args.distill_weight,
        }.items()
        if v is not None
    }
    model = base.model
    if args.presence_head:
        model = dataclasses.replace(model, presence_head=True)
    if args.temporal:
        model = dataclasses.replace(model, in_channels=2)
    if model != base.model:
        overrides["model"] = model
    return dataclasses.replace(
        base, modalities=modalities, minutes=args.minutes, steps=args.steps, seed=args.seed, **overrides
    )
