"""Shared types and geometry helpers of the simulated scanners (ultrasound and fluoroscopy phantoms).

Coordinates follow :mod:`guidance.results`: pixel ``(x, y)`` = (column, row), origin at the centre of the
top-left pixel. Every phantom is a pure function of ``(seed, frame index)``: ``frame(i)`` can be called in any
order and always returns the same pixels, so a training set, an evaluation set and the live simulator can
draw the same frames without storing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

Modality = Literal["us", "fluoro"]
PointF = tuple[float, float]

#: Fixed-point bits used when drawing with cv2 (sub-pixel accurate polygons and lines).
DRAW_SHIFT = 4
_SCALE = float(1 << DRAW_SHIFT)


@dataclass(frozen=True, slots=True, eq=False)
class PhantomFrame:
    """One simulated frame with its ground truth.

    Attributes:
        index: frame number in the sequence (0-based).
        time_s: ``index / fps``.
        image: ``(rows, cols)`` uint8 (ultrasound, 8-bit fluoro) or uint16 (16-bit fluoro).
        labels: ``(rows, cols)`` uint8, values index :data:`engines.base.CLASS_NAMES`
            (0 background, 1 instrument, 2 target). Only the visible, in-plane part of the instrument is
            labelled.
        instrument_present: whether any instrument pixel is labelled in this frame.
        tip_px: instrument tip ``(x, y)`` (the far end along the insertion direction), or None.
        entry_px: where the instrument enters the field of view, or None.
        axis_angle_deg: angle of the entry->tip axis (the chord) to the image x axis in [0, 180), or None.
        tip_direction_deg: angle of the instrument's tangent at the tip (where it is heading) to the x axis
            in [0, 180), or None. Equal to ``axis_angle_deg`` for a straight needle; for a curved catheter
            the two differ by the bend (a median 26 degrees on the fluoroscopy validation set), so an
            estimate is compared with the one it estimates.
        target_centroid_px: centroid of the whole target lesion (also where it is hidden under the
            instrument), or None when no target is in view.
        target_radius_px: equivalent radius ``sqrt(area / pi)`` of the lesion (0 when none).
        spacing_mm: pixel spacing ``(x, y)`` in millimetres.
        modality: ``"us"`` or ``"fluoro"``.
        centerline_px: ``(N, 2)`` float32 points entry -> tip along the instrument (2 points for a straight
            needle, a polyline for a curved catheter), or None.
    """

    index: int
    time_s: float
    image: npt.NDArray[np.generic]
    labels: npt.NDArray[np.uint8]
    instrument_present: bool
    tip_px: PointF | None
    entry_px: PointF | None
    axis_angle_deg: float | None
    target_centroid_px: PointF | None
    target_radius_px: float
    spacing_mm: tuple[float, float]
    modality: Modality
    centerline_px: npt.NDArray[np.float32] | None = None
    tip_direction_deg: float | None = None


class Phantom(Protocol):
    """What every phantom offers (random access and iteration)."""

    seed: int
    width: int
    height: int
    fps: float
    spacing_mm: tuple[float, float]
    modality: Modality

    def frame(self, index: int) -> PhantomFrame: ...

    def __iter__(self) -> Iterator[PhantomFrame]: ...


def frame_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on ``(seed, index, stream)`` (random access, no shared state)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, index & 0xFFFFFFFF, stream])


def fixed(p: PointF) -> tuple[int, int]:
    """Point in cv2's fixed-point coordinates (use with ``shift=DRAW_SHIFT``)."""
    return round(p[0] * _SCALE), round(p[1] * _SCALE)


def fill_segment(dst: npt.NDArray[Any], a: PointF, b: PointF, width_px: float, value: float) -> None:
    """Fill the rectangle of width ``width_px`` around segment a-b (flat ends exactly at a and b)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    n = math.hypot(dx, dy)
    if n < 1e-6:
        return
    hx, hy = -dy / n * width_px / 2.0, dx / n * width_px / 2.0
    poly = np.array(
        [
            fixed((a[0] + hx, a[1] + hy)),
            fixed((b[0] + hx, b[1] + hy)),
            fixed((b[0] - hx, b[1] - hy)),
            fixed((a[0] - hx, a[1] - hy)),
        ],
        dtype=np.int32,
    )
    cv2.fillConvexPoly(dst, poly, value, lineType=cv2.LINE_8, shift=DRAW_SHIFT)


def clip_ray_to_box(p: PointF, d: PointF, width: int, height: int) -> float:
    """Largest ``t >= 0`` with ``p + t*d`` inside ``[0, width-1] x [0, height-1]`` (0 when outside)."""
    t_max = math.inf
    for pc, dc, hi in ((p[0], d[0], width - 1.0), (p[1], d[1], height - 1.0)):
        if dc > 1e-12:
            t_max = min(t_max, (hi - pc) / dc)
        elif dc < -1e-12:
            t_max = min(t_max, (0.0 - pc) / dc)
    return max(0.0, t_max) if math.isfinite(t_max) else 0.0


def smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


def insertion_cycle(
    t: float,
    lead_in_s: float,
    cycle_s: float,
    phases: tuple[float, float, float, float, float],
    partial: float,
) -> float:
    """Instrument depth (0..1) over a repeating procedure: advance, hold, withdraw by ``partial``,
    re-advance, withdraw fully, pause. ``phases`` are the cycle fractions where each of the first five
    steps ends; 0 before ``lead_in_s`` and during the pause (no instrument in view)."""
    u = t - lead_in_s
    if u < 0.0:
        return 0.0
    ph = (u % cycle_s) / cycle_s
    advance, hold, back, readvance, out = phases
    if ph < advance:
        return smoothstep(ph / advance)
    if ph < hold:
        return 1.0
    if ph < back:
        return 1.0 - partial * smoothstep((ph - hold) / (back - hold))
    if ph < readvance:
        return 1.0 - partial + partial * smoothstep((ph - back) / (readvance - back))
    if ph < out:
        return 1.0 - smoothstep((ph - readvance) / (out - readvance))
    return 0.0


def axis_angle_deg(direction: PointF) -> float:
    """Angle of a direction to the image x axis, folded into [0, 180)."""
    return math.degrees(math.atan2(direction[1], direction[0])) % 180.0


def irregular_blob(
    rng: np.random.Generator, radius_px: float, irregularity: float, n_points: int = 64
) -> npt.NDArray[np.float64]:
    """Closed outline ``(n, 2)`` around the origin: a circle with a few low-order harmonics on its radius."""
    theta = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += irregularity * rng.uniform(0.0, 1.0) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r *= radius_px
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def fill_polygon(dst: npt.NDArray[Any], pts: npt.NDArray[np.float64], value: float) -> None:
    poly = np.round(pts * _SCALE).astype(np.int32)
    cv2.fillPoly(dst, [poly], value, lineType=cv2.LINE_8, shift=DRAW_SHIFT)
