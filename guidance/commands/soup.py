"""``guidance soup``: average the weights of training runs fine-tuned from one network."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "soup",
        help="average the weights of training runs fine-tuned from one network (needs the 'train' extra)",
        description="Averages the weights (and BatchNorm statistics) of two or more training runs of one "
        "architecture, normally fine-tunes of one network, and writes <out>/<name>.pt, .onnx and .json. "
        "The card names each ingredient with the sha256 of its weights. Calibrate the result with "
        "'guidance calibrate' before using it.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="CARD[=WEIGHT]",
        help="training run cards (.json, the .pt beside each); an optional =WEIGHT sets its share "
        "(default 1; shares are normalised)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the averaged .pt, ONNX and card")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guidance.cli import CommandError

    try:
        from guidance import soup
    except ImportError as exc:
        raise CommandError(f"soup needs the 'train' extra (pip install -e '.[train]'): {exc}") from None
    try:
        ingredients = [soup.parse_ingredient(r) for r in args.runs]
        _, card = soup.make_soup(ingredients, args.out)
    except soup.SoupError as exc:
        raise CommandError(str(exc)) from None
    logger.info("wrote %s; next: guidance calibrate %s --out DIR", card, card)
    return 0
