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

__all__ = [
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


def make_phantom(modality: str, **kw: Any) -> Phantom:
    """Create the phantom of ``modality`` (``"us"`` or ``"fluoro"``); ``kw`` go to its constructor."""
    m = modality.lower()
    if m in ("us", "ultrasound"):
        return UltrasoundPhantom(**kw)
    if m in ("fluoro", "xa", "xray", "x-ray"):
        return FluoroPhantom(**kw)
    raise ValueError(f"unknown phantom modality {modality!r}; use 'us' or 'fluoro'")


def sample_config(modality: str, seed: int) -> UltrasoundConfig | FluoroConfig:
    """The configuration ``make_phantom(modality, seed=seed)`` draws, without building the phantom."""
    m = modality.lower()
    if m in ("us", "ultrasound"):
        return UltrasoundConfig.sample(seed)
    if m in ("fluoro", "xa", "xray", "x-ray"):
        return FluoroConfig.sample(seed)
    raise ValueError(f"unknown phantom modality {modality!r}; use 'us' or 'fluoro'")
