"""Simulated scanners with ground truth: B-mode ultrasound and X-ray fluoroscopy phantoms.

Every phantom is deterministic from ``(seed, frame index)`` with random access (``frame(i)``) and endless
iteration, and returns :class:`PhantomFrame` (image + label map + instrument/target geometry).
"""

from __future__ import annotations

from typing import Any

from guidance.phantoms.base import Phantom, PhantomFrame
from guidance.phantoms.fluoro import FluoroConfig, FluoroPhantom
from guidance.phantoms.ultrasound import UltrasoundConfig, UltrasoundPhantom

#: The ultrasound sequence description (the name issue #4 uses); :class:`FluoroConfig` is its X-ray twin.
PhantomConfig = UltrasoundConfig

#: Fixed validation sequences: ``VALIDATION_SEED_BASE + 1000 * modality index + k`` (training's monitoring
#: for small k, calibration's +100 to +147, the evaluation's ``further-validation`` set +148 to +243).
#: Training draws its sequences far above (guidance.training.TRAIN_SEED_RANGE), the held-out set far below.
VALIDATION_SEED_BASE = 500_000

__all__ = [
    "VALIDATION_SEED_BASE",
    "FluoroConfig",
    "FluoroPhantom",
    "Phantom",
    "PhantomConfig",
    "PhantomFrame",
    "UltrasoundConfig",
    "UltrasoundPhantom",
    "make_phantom",
    "sample_config",
]


_ALIASES = {
    "us": "us",
    "ultrasound": "us",
    "fluoro": "fluoro",
    "xa": "fluoro",
    "xray": "fluoro",
    "x-ray": "fluoro",
}


def _canonical(modality: str) -> str:
    try:
        return _ALIASES[modality.lower()]
    except KeyError:
        raise ValueError(f"unknown phantom modality {modality!r}; use 'us' or 'fluoro'") from None


def make_phantom(modality: str, **kw: Any) -> Phantom:
    """Create the phantom of ``modality`` (``"us"`` or ``"fluoro"``); ``kw`` go to its constructor."""
    return UltrasoundPhantom(**kw) if _canonical(modality) == "us" else FluoroPhantom(**kw)


def sample_config(modality: str, seed: int) -> UltrasoundConfig | FluoroConfig:
    """The configuration ``make_phantom(modality, seed=seed)`` draws, without building the phantom."""
    return UltrasoundConfig.sample(seed) if _canonical(modality) == "us" else FluoroConfig.sample(seed)
