"""Frozen result types that cross from the inference worker to the UI, recorder and archive.

Coordinates are image pixels ``(x, y)`` = (column, row), origin at the centre of the top-left pixel.
Distances in millimetres use the frame's ``spacing_mm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from guidance.latency import StageTimes
from streaming.frame import Frame

Point = tuple[float, float]
Polygon = npt.NDArray[np.float32]  # (N, 2) x, y


@dataclass(frozen=True, slots=True, eq=False)
class InstrumentEstimate:
    """Needle or catheter found in one frame.

    Attributes:
        tip_px: the far end along the insertion direction (temporally filtered).
        raw_tip_px: the unfiltered tip of this frame.
        entry_px: the other end of the visible shaft.
        direction: unit vector (x, y): the heading at the tip, where the instrument points (the projected
            trajectory follows it). Along the shaft for a straight needle; along the tip's tangent for a
            bent catheter, which can point tens of degrees off its entry -> tip chord.
        angle_deg: angle of ``direction`` to the image x axis, degrees in [0, 180).
        length_mm: visible shaft length.
        confidence: 0..1; drops when the mask is fragmentary, short, or weakly scored.
        trajectory_end_px: the projected path (tip extended along ``direction``) where it leaves the image.
        centerline_px: (N, 2) ordered points entry -> tip (a straight segment for needles, a curve for
            catheters).
    """

    tip_px: Point
    raw_tip_px: Point
    entry_px: Point
    direction: Point
    angle_deg: float
    length_mm: float
    confidence: float
    trajectory_end_px: Point
    centerline_px: Polygon

    @property
    def axis_angle_deg(self) -> float:
        """Angle of the entry -> tip chord (the shaft's axis) to the image x axis, degrees in [0, 180)."""
        dx, dy = self.raw_tip_px[0] - self.entry_px[0], self.raw_tip_px[1] - self.entry_px[1]
        return math.degrees(math.atan2(dy, dx)) % 180.0


@dataclass(frozen=True, slots=True, eq=False)
class TargetEstimate:
    centroid_px: Point
    area_mm2: float
    equivalent_diameter_mm: float
    contour_px: Polygon


@dataclass(frozen=True, slots=True, eq=False)
class Interpretation:
    """Geometry read off one label map."""

    instrument: InstrumentEstimate | None
    target: TargetEstimate | None
    instrument_contours: tuple[Polygon, ...] = ()
    target_contours: tuple[Polygon, ...] = ()
    tip_to_target_mm: float | None = None  # tip to target centroid
    tip_to_boundary_mm: float | None = None  # tip to nearest target boundary point (<0 inside)
    on_path: bool | None = None  # projected trajectory passes through the target
    status: str = "no instrument"  # "ok" | "no instrument" | "low confidence" | "no target"


EMPTY_INTERPRETATION = Interpretation(instrument=None, target=None)

#: Jitter allowance when judging an overlay stale, as a fraction of the budget.
STALE_TOLERANCE = 0.25


def overlay_is_stale(age_ms: float, budget_ms: float) -> bool:
    """Whether an overlay ``age_ms`` older than the picture it is drawn on should be shown as stale.

    ``age_ms`` is the difference between the receive times of the painted frame and of the result's
    frame. The picture is painted the moment it arrives, so while the AI keeps its budget (one frame
    interval by default) the overlay is routinely one frame behind: that is *lagging*, shown with its age.
    It is *stale* once it is older than the budget plus a 25 % allowance for arrival jitter, so one frame of
    lag at the default budget never flickers between the two.
    """
    return budget_ms > 0 and age_ms > budget_ms * (1.0 + STALE_TOLERANCE)


@dataclass(frozen=True, slots=True, eq=False)
class GuidanceResult:
    """Everything the AI concluded about one frame, stamped through the pipeline."""

    frame: Frame
    labels: npt.NDArray[np.uint8]
    interpretation: Interpretation
    times: StageTimes
    engine: str
    budget_ms: float
    skipped_before: int = 0  # frames the worker skipped since its previous result
    over_budget: bool = False  # inference + interpretation took longer than the budget
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return self.frame.seq

    def age_ms(self, now_ns: int) -> float:
        """Age of this result relative to its frame's arrival, at ``now_ns`` (perf_counter_ns)."""
        return (now_ns - self.frame.receive_ns) / 1e6
