"""Weight averaging ("model soup") of training runs that share an architecture and a starting point.

Fine-tunes that start from one set of weights stay in one basin of the loss, and the average of their
weights is often better than each of them, at no cost at inference: the averaged network is one network
of the same size (Wortsman et al., "Model soups", ICML 2022; Izmailov et al., "Averaging weights leads to
wider optima", UAI 2018). Here it is how runs that each trade one figure for another (run s38 more
fluoroscopy hard negatives, run s39 whole-frame crops, both fine-tuned from the shipped s37) are combined
without a new training run, which this CPU cannot afford.

BatchNorm's running statistics are averaged like the weights. For fine-tunes of one network they
differ little, and the soup's calibration and evaluation (run on the averaged network, as shipped) measure
whatever this costs.

The soup is not calibrated here: the result is a training run like any other, and goes through
``guidance calibrate`` (operating point on validation) and ``guidance evaluate`` (held-out) as one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.models.unet import (
    CardInfo,
    UNetConfig,
    build_model,
    export_model_asset,
    read_model_card,
    sha256_file,
)
from guidance.calibration import OPERATING_POINT_LIMIT

logger = logging.getLogger(__name__)


class SoupError(RuntimeError):
    """The ingredients cannot be averaged; one readable line."""


@dataclass(frozen=True, slots=True)
class Ingredient:
    """One training run: its card (with the ``.pt`` beside it) and its share of the average."""

    card: Path
    weight: float = 1.0


def parse_ingredient(text: str) -> Ingredient:
    """``CARD`` or ``CARD=WEIGHT`` (a positive number; the shares are normalised to sum to 1)."""
    path, sep, w = text.rpartition("=")
    if not sep:
        return Ingredient(Path(text))
    try:
        weight = float(w)
    except ValueError:
        raise SoupError(f"{text!r}: the weight after '=' must be a number") from None
    if not weight > 0.0:
        raise SoupError(f"{text!r}: the weight must be positive")
    return Ingredient(Path(path), weight)


def average_state_dicts(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of floating-point entries; integer ones (BatchNorm's step count) from the first.

    The entries must match in names and shapes; :class:`SoupError` says which one does not.
    """
    if not states or len(states) != len(weights):
        raise SoupError("need one weight per state dict, and at least one state dict")
    total = float(sum(weights))
    first = states[0]
    for i, s in enumerate(states[1:], start=2):
        if s.keys() != first.keys():
            diff = sorted(set(s.keys()) ^ set(first.keys()))
            raise SoupError(f"ingredient {i} has other layers than the first: {', '.join(diff[:3])}")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise SoupError(
                    f"ingredient {i}: {k} has shape {tuple(v.shape)}, the first {tuple(first[k].shape)}"
                )
    out: dict[str, torch.Tensor] = {}
    for k, v in first.items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc += s[k].to(torch.float64) * (w / total)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def make_soup(ingredients: Sequence[Ingredient], out_dir: Path) -> tuple[Path, Path]:
    """Average the runs' weights and write ``<name>.pt``, ``.onnx`` and ``.json`` into ``out_dir``.

    The card's ``training`` block names each ingredient (card version, weight share, sha256 of its
    ``.pt``) and keeps each one's own training block, so the soup is reproducible from its runs.
    """
    if len(ingredients) < 2:
        raise SoupError("a soup needs at least two training runs")
    cards: list[dict[str, Any]] = []
    states: list[dict[str, torch.Tensor]] = []
    for ing in ingredients:
        if not ing.card.is_file():
            raise SoupError(f"{ing.card} not found")
        pt = ing.card.with_suffix(".pt")
        if not pt.is_file():
            raise SoupError(f"{pt} not found: a soup needs each run's weights beside its card")
        cards.append(read_model_card(ing.card))
        states.append(torch.load(pt, map_location="cpu", weights_only=True))
    arch = [c.get("architecture", {}).get("config", {}) for c in cards]
    if any(a != arch[0] for a in arch[1:]):
        raise SoupError("the runs have different architectures; only one network's weights can be averaged")
    sizes = {(int(c["input"]["height"]), int(c["input"]["width"])) for c in cards}
    if len(sizes) != 1:
        raise SoupError(f"the runs take different input sizes: {sorted(sizes)}")
    h, w = next(iter(sizes))
    weights = [ing.weight for ing in ingredients]
    averaged = average_state_dicts(states, weights)
    model = build_model(UNetConfig.from_dict(arch[0]))
    model.load_state_dict(averaged)
    model.eval()

    total = sum(weights)
    versions = [str(c.get("version", "")) for c in cards]
    name = str(cards[0]["name"])
    tags = "+".join(v.rsplit("-", 1)[-1] for v in versions)
    version = time.strftime("%Y.%m.%d-%H%M", time.gmtime()) + f"-soup-{tags}"
    training = {
        "data": cards[0].get("training", {}).get("data", ""),
        "soup": {
            "method": "weighted average of the ingredients' weights and BatchNorm statistics "
            "(guidance soup; Wortsman et al. 2022)",
            "ingredients": [
                {
                    "card": str(ing.card),
                    "version": v,
                    "share": round(ing.weight / total, 6),
                    "weights_sha256": sha256_file(ing.card.with_suffix(".pt")),
                }
                for ing, v in zip(ingredients, versions, strict=True)
            ],
        },
        "ingredients_training": [c.get("training", {}) for c in cards],
    }
    # An ingredient's calibrated operating point is not the soup's: the soup is calibrated afresh.
    limits = tuple(x for x in cards[0].get("limits", ()) if not str(x).startswith(OPERATING_POINT_LIMIT))
    info = CardInfo(name=name, version=version, training=training, limits=limits)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / f"{name}.pt")
    onnx_path, card_path = export_model_asset(model, out_dir, info, height=h, width=w)
    logger.info("averaged %d runs (%s) into %s", len(ingredients), ", ".join(versions), card_path)
    return onnx_path, card_path
