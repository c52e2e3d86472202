"""From a label map to guidance geometry: instrument axis and tip, target, trajectory, distances, confidence.

:class:`Interpreter` is stateful only for time: it keeps the insertion direction consistent from frame to
frame and smooths the tip with a one-euro filter (steady when the needle is still, little lag when it
moves). Everything else is read off the current label map. One ``update`` costs well under a millisecond
at 256x256 (cv2 contours/components, one robust line fit).

Conventions (see :mod:`guidance.results`): pixel ``(x, y)`` = (column, row), origin at the centre of the
top-left pixel; ``spacing_mm`` is ``(x, y)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from engines.base import INSTRUMENT, TARGET
from guidance.results import (
    EMPTY_INTERPRETATION,
    InstrumentEstimate,
    Interpretation,
    Point,
    Polygon,
    TargetEstimate,
)

logger = logging.getLogger(__name__)

__all__ = ["Interpreter", "OneEuroFilter", "TipFilterParams"]


@dataclass(frozen=True, slots=True)
class TipFilterParams:
    """One-euro filter settings for the tip (Casiez et al., CHI 2012).

    ``min_cutoff_hz`` sets the smoothing when the tip is still (lower: steadier); ``beta`` (per px/s) how
    fast the cutoff rises with speed (higher: less lag when the needle moves). The filter restarts after
    ``reset_after_s`` without an instrument or on a jump of more than ``reset_jump_px``.
    """

    min_cutoff_hz: float = 1.0
    beta: float = 0.05
    d_cutoff_hz: float = 1.0
    reset_after_s: float = 0.5
    reset_jump_px: float = 40.0


class OneEuroFilter:
    """One-euro low-pass filter on a 2-D point with irregular time steps."""

    __slots__ = ("_dx", "_t", "_x", "beta", "d_cutoff_hz", "min_cutoff_hz")

    def __init__(self, min_cutoff_hz: float = 1.0, beta: float = 0.05, d_cutoff_hz: float = 1.0) -> None:
        if min_cutoff_hz <= 0 or d_cutoff_hz <= 0 or beta < 0:
            raise ValueError("one-euro cutoffs must be > 0 and beta >= 0")
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.d_cutoff_hz = d_cutoff_hz
        self._t: float | None = None
        self._x = (0.0, 0.0)
        self._dx = (0.0, 0.0)

    @staticmethod
    def _alpha(cutoff_hz: float, dt: float) -> float:
        tau = 1.0 / (2.0 * math.pi * cutoff_hz)
        return 1.0 / (1.0 + tau / dt)

    def reset(self) -> None:
        self._t = None

    @property
    def started(self) -> bool:
        return self._t is not None

    def __call__(self, t: float, x: Point) -> Point:
        """Filter sample ``x`` taken at time ``t`` (seconds); returns the smoothed point."""
        if self._t is None:
            self._t, self._x, self._dx = t, (float(x[0]), float(x[1])), (0.0, 0.0)
            return self._x
        dt = t - self._t
        if dt <= 1e-6:  # same or out-of-order timestamp: assume one nominal frame
            dt = 1.0 / 30.0
        a_d = self._alpha(self.d_cutoff_hz, dt)
        raw_dx = ((x[0] - self._x[0]) / dt, (x[1] - self._x[1]) / dt)
        dx = (self._dx[0] + a_d * (raw_dx[0] - self._dx[0]), self._dx[1] + a_d * (raw_dx[1] - self._dx[1]))
        cutoff = self.min_cutoff_hz + self.beta * math.hypot(dx[0], dx[1])
        a = self._alpha(cutoff, dt)
        self._x = (self._x[0] + a * (x[0] - self._x[0]), self._x[1] + a * (x[1] - self._x[1]))
        self._dx = dx
        self._t = t
        return self._x


_CLOSE_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))


def _contours(mask: npt.NDArray[np.uint8]) -> tuple[Polygon, ...]:
    cs, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return tuple(np.asarray(c, dtype=np.float32).reshape(-1, 2) for c in cs)


def _pixel_area(c: Polygon) -> float:
    """Pixels covered by a region from its pixel-centre outline (enclosed area + half the perimeter + 1)."""
    return float(cv2.contourArea(c)) + 0.5 * float(cv2.arcLength(c, True)) + 1.0


def _ray_exit(p: Point, d: Point, width: int, height: int) -> Point:
    """Where the ray ``p + t*d`` (t >= 0) leaves ``[0, width-1] x [0, height-1]``."""
    t_max = math.inf
    for pc, dc, hi in ((p[0], d[0], width - 1.0), (p[1], d[1], height - 1.0)):
        if dc > 1e-12:
            t_max = min(t_max, (hi - pc) / dc)
        elif dc < -1e-12:
            t_max = min(t_max, -pc / dc)
    t = max(0.0, t_max) if math.isfinite(t_max) else 0.0
    return (p[0] + t * d[0], p[1] + t * d[1])


def _border_distance(p: Point, width: int, height: int) -> float:
    return min(p[0], p[1], width - 1.0 - p[0], height - 1.0 - p[1])


def _mm(dx: float, dy: float, spacing: tuple[float, float]) -> float:
    return math.hypot(dx * spacing[0], dy * spacing[1])


class Interpreter:
    """Reads instrument and target geometry off label maps, one frame after another.

    Args:
        tip_filter: one-euro settings for the tip, or None for the raw tip.
        min_instrument_px: fewer instrument pixels than this means "no instrument".
        min_length_px: visible shafts shorter than this get a reduced confidence.
        min_length_frac: a visible shaft shorter than this fraction of the frame's longer side means
            "no instrument". Relative, not in pixels: a label map upscaled to a 616x820 frame turns a
            2x2 blob of the 256x256 network output into 40 frame pixels, which passed
            ``min_instrument_px`` (scale-free; spacing in real files is not always true, PLUS sample files
            say 1 mm/px).
        min_elongation: ``length² / pixels`` of the instrument below this (a blob, not a shaft) means "no
            instrument": a dot has no axis, so no trajectory can be drawn from it, and dots were what the
            network reported on the N-wire cross-sections of the real PLUS recordings. A shaft ``k``
            widths long scores ``k``. On the validation phantoms (720 frames per modality) 6/256 of the frame
            and 2 widths dropped no ultrasound detection and 1-4 fluoroscopy stubs per model (tip error
            under 0.5 mm; they return as the catheter advances), where 8/256 and 3 dropped 7-12.
        min_confidence: below this confidence there is no instrument: the mask is not one shaft but
            scattered pieces (several separate blobs, most pixels off the fitted line, a patchy line), and a
            tip, trajectory and distance drawn from it would be made up. On the validation phantoms (720
            frames per modality, four models) 0.25 dropped 0-3 true detections per model, and the only ones
            it dropped with a tip error over 2 mm had locked onto another structure (24-26 mm off). On the
            real PLUS recordings the false detections were wire cross-sections, several dots at once;
            for a model that made many (run s17) 80 % of them scored 0.04-0.4, and 0.25 removed four in
            five (68 % of frames -> 14 %). (Chosen after looking at those frames, so the PLUS rate is not
            a blind test of this rule.)
        low_confidence: below this confidence the status is "low confidence".
        direction_margin_px: when both shaft ends are this close to equally near the border, keep the
            insertion direction of the previous frames instead of flipping.
        min_sagitta_px: a shaft the straight-line fit accepts, but whose best parabola bows at least this
            far from its chord, is read as gently bent: its heading at the tip comes from the parabola's
            slope there, not from the chord. A catheter bent a few pixels points elsewhere than its chord
            (up to 13 degrees on the fluoroscopy validation phantoms). On the validation phantoms
            (48 sequences per modality, the shipped model's masks) 2 px cut the fluoroscopy heading error
            from 0.71/10.8 to 0.50/8.4 degrees (median/p95) and left ultrasound at 0.14/2.5 (from
            0.14/2.4); 1 px bent straight ultrasound needles (p95 3.5).
        heading_radius_px: on a curved shaft, the heading at the tip is the slope at the tip of a parabola
            fitted to the mask within this distance of it. The chord to the centreline point 10 px back
            lags the bend by half its turn over those pixels; on the same validation masks the parabola
            over 20 px cut the curved catheters' heading error from 4.5/9.8 to 2.2/7.9 degrees (30 px:
            2.4/7.5, 40 px: 3.0/11.3 in the trial script, as the parabola stops fitting the bend).
    """

    def __init__(
        self,
        *,
        tip_filter: TipFilterParams | None = TipFilterParams(),
        min_instrument_px: int = 20,
        min_length_px: float = 12.0,
        min_length_frac: float = 6.0 / 256.0,
        min_elongation: float = 2.0,
        min_confidence: float = 0.25,
        low_confidence: float = 0.4,
        direction_margin_px: float = 8.0,
        min_sagitta_px: float = 2.0,
        heading_radius_px: float = 20.0,
    ) -> None:
        self.tip_filter = tip_filter
        self.min_instrument_px = int(min_instrument_px)
        self.min_length_px = float(min_length_px)
        self.min_length_frac = float(min_length_frac)
        self.min_elongation = float(min_elongation)
        self.min_confidence = float(min_confidence)
        self.low_confidence = float(low_confidence)
        self.direction_margin_px = float(direction_margin_px)
        self.min_sagitta_px = float(min_sagitta_px)
        self.heading_radius_px = float(heading_radius_px)
        self._filter = (
            OneEuroFilter(tip_filter.min_cutoff_hz, tip_filter.beta, tip_filter.d_cutoff_hz)
            if tip_filter is not None
            else None
        )
        self._prev_dir: Point | None = None
        self._last_seen_s: float | None = None
        self._last_raw_tip: Point | None = None

    def reset(self) -> None:
        """Forget the temporal state (new sequence, new source)."""
        if self._filter is not None:
            self._filter.reset()
        self._prev_dir = None
        self._last_seen_s = None
        self._last_raw_tip = None

    # ------------------------------------------------------------------ main entry
    def update(
        self,
        labels: npt.NDArray[np.uint8],
        spacing_mm: tuple[float, float],
        time_s: float,
        instrument_prob: npt.NDArray[np.float32] | None = None,
    ) -> Interpretation:
        """Interpret one ``(rows, cols)`` label map taken at ``time_s`` (any monotonic clock, seconds)."""
        if labels.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
        h, w = labels.shape
        inst = (labels == INSTRUMENT).view(np.uint8)
        tgt = (labels == TARGET).view(np.uint8)
        inst_contours = _contours(inst)
        tgt_contours = _contours(tgt)
        if not inst_contours and not tgt_contours:
            self._note_missing(time_s)
            return EMPTY_INTERPRETATION

        target = self._target(tgt, tgt_contours, spacing_mm)
        instrument = self._instrument(inst, inst_contours, spacing_mm, time_s, instrument_prob)
        if instrument is None:
            self._note_missing(time_s)
            return Interpretation(
                instrument=None,
                target=target,
                instrument_contours=inst_contours,
                target_contours=tgt_contours,
                status="no instrument",
            )

        to_target = to_boundary = None
        on_path: bool | None = None
        if target is not None:
            tip = instrument.tip_px
            c = target.centroid_px
            to_target = _mm(tip[0] - c[0], tip[1] - c[1], spacing_mm)
            scaled = target.contour_px * np.asarray(spacing_mm, dtype=np.float32)
            inside = cv2.pointPolygonTest(
                scaled.reshape(-1, 1, 2), (tip[0] * spacing_mm[0], tip[1] * spacing_mm[1]), True
            )
            to_boundary = -float(inside)
            on_path = self._ray_hits(tgt, tip, instrument.direction, w, h)
        if instrument.confidence < self.low_confidence:
            status = "low confidence"
        elif target is None:
            status = "no target"
        else:
            status = "ok"
        return Interpretation(
            instrument=instrument,
            target=target,
            instrument_contours=inst_contours,
            target_contours=tgt_contours,
            tip_to_target_mm=to_target,
            tip_to_boundary_mm=to_boundary,
            on_path=on_path,
            status=status,
        )

    # ------------------------------------------------------------------ pieces
    def _note_missing(self, time_s: float) -> None:
        if (
            self._last_seen_s is not None
            and self.tip_filter is not None
            and time_s - self._last_seen_s > self.tip_filter.reset_after_s
        ):
            self.reset()

    @staticmethod
    def _target(
        tgt: npt.NDArray[np.uint8], contours: tuple[Polygon, ...], spacing: tuple[float, float]
    ) -> TargetEstimate | None:
        if not contours:
            return None
        largest = max(contours, key=_pixel_area)
        # The instrument overrides the target in a label map: a needle inside the lesion cuts a slot into
        # it. Close the region (kernel wider than a shaft) so contour, centroid and area are the lesion's.
        pad = 6  # > kernel radius, so the closing never touches the ROI border
        x, y, bw, bh = cv2.boundingRect(largest)
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(tgt.shape[1], x + bw + pad), min(tgt.shape[0], y + bh + pad)
        sub = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(sub, [np.round(largest).astype(np.int32) - np.array([x0, y0], np.int32)], 1)
        sub &= tgt[y0:y1, x0:x1]  # the outline's own interior (holes of other classes stay out until closed)
        sub = np.asarray(cv2.morphologyEx(sub, cv2.MORPH_CLOSE, _CLOSE_KERNEL), dtype=np.uint8)
        m = cv2.moments(sub, binaryImage=True)
        area_px = float(m["m00"])
        if area_px <= 0:
            return None
        centroid = (x0 + m["m10"] / area_px, y0 + m["m01"] / area_px)
        cs, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
        contour = np.asarray(max(cs, key=len), dtype=np.float32).reshape(-1, 2)
        area_mm2 = area_px * spacing[0] * spacing[1]
        return TargetEstimate(
            centroid_px=(float(centroid[0]), float(centroid[1])),
            area_mm2=area_mm2,
            equivalent_diameter_mm=2.0 * math.sqrt(area_mm2 / math.pi),
            contour_px=contour,
        )

    def _instrument(
        self,
        inst: npt.NDArray[np.uint8],
        contours: tuple[Polygon, ...],
        spacing: tuple[float, float],
        time_s: float,
        prob: npt.NDArray[np.float32] | None,
    ) -> InstrumentEstimate | None:
        h, w = inst.shape
        total_px = int(np.count_nonzero(inst))
        if total_px < self.min_instrument_px:
            return None
        ys, xs = self._main_instrument(inst, prob, len(contours))
        n_px = xs.size
        if n_px < self.min_instrument_px:
            return None
        pts = np.stack([xs, ys], axis=1).astype(np.float32)
        vx, vy, cx, cy = (float(v) for v in cv2.fitLine(pts, cv2.DIST_HUBER, 0, 0.01, 0.01).ravel())
        rel = pts - np.array([cx, cy], dtype=np.float32)
        t = rel @ np.array([vx, vy], dtype=np.float32)
        perp = np.abs(rel @ np.array([-vy, vx], dtype=np.float32))
        tol = max(2.5, 2.0 * float(np.median(perp)) + 1.5)
        inl = perp <= tol
        t_in = t[inl]
        if t_in.size < self.min_instrument_px // 2 + 1:
            return None
        # Ends = extreme inlier pixel centres (for a solid shaft a few px wide they lie within a fraction of
        # a pixel of the true flat end; no half-pixel extension, which measured as a bias).
        t0, t1 = float(t_in.min()), float(t_in.max())
        length_px = t1 - t0  # the visible shaft's chord
        if length_px < self.min_length_frac * max(h, w) or length_px**2 < self.min_elongation * n_px:
            return None  # a blob or a speck: no shaft, no axis
        # Confidence: one clean, solid, long enough component scores 1; fragments, gaps, stray pixels,
        # short stubs and (when given) weak instrument probabilities pull it down.
        significant = sum(1 for c in contours if _pixel_area(c) >= max(3.0, 0.05 * total_px))
        comp_factor = 1.0 / (1.0 + 0.35 * max(0, significant - 1))
        # Pixels left out of the geometry (strays, fragments off the shaft's line) count against it.
        inlier_frac = t_in.size / total_px
        bins = np.zeros(max(1, math.ceil(length_px)) + 1, dtype=bool)
        bins[np.clip((t_in - t0).astype(np.intp), 0, bins.size - 1)] = True
        coverage = float(bins[:-1].mean()) if bins.size > 1 else 1.0
        length_factor = min(1.0, length_px / (2.0 * self.min_length_px))
        conf = comp_factor * inlier_frac * min(1.0, coverage * 1.1) * length_factor
        if prob is not None and prob.shape == inst.shape:
            conf *= min(1.0, float(prob[ys, xs].mean()) / 0.5)
        conf = float(min(1.0, max(0.0, conf)))
        if conf < self.min_confidence:
            return None  # scattered pieces, not a shaft (before any tracking state is touched)

        a = (cx + t0 * vx, cy + t0 * vy)
        b = (cx + t1 * vx, cy + t1 * vy)

        # Insertion direction: from the end nearest the border (where it enters) to the other end; when
        # that is ambiguous keep the previous frames' direction.
        da, db = _border_distance(a, w, h), _border_distance(b, w, h)
        forward = (vx, vy)  # a -> b
        if abs(da - db) > self.direction_margin_px or self._prev_dir is None:
            a_is_entry = da <= db
        else:
            a_is_entry = vx * self._prev_dir[0] + vy * self._prev_dir[1] >= 0.0
        entry, raw_tip = (a, b) if a_is_entry else (b, a)
        direction = forward if a_is_entry else (-vx, -vy)
        self._prev_dir = direction
        centerline: npt.NDArray[np.float32] | None = None
        curved = float(np.percentile(perp[inl], 98)) > 3.5 or t_in.size < 0.9 * n_px
        if curved:  # a curved catheter / guidewire: follow the mask, not the chord
            entry, raw_tip, direction, centerline = self._curved(
                pts, t, perp, tol, a_is_entry, heading_radius_px=self.heading_radius_px
            )
        else:  # straight or gently bent: the heading at the tip, which a bend turns away from the line
            direction = _bent_heading(pts, entry, raw_tip, direction, self.min_sagitta_px)

        tip = raw_tip
        if self._filter is not None and self.tip_filter is not None:
            jumped = (
                self._last_raw_tip is not None
                and math.dist(self._last_raw_tip, raw_tip) > self.tip_filter.reset_jump_px
            )
            stale = (
                self._last_seen_s is not None and time_s - self._last_seen_s > self.tip_filter.reset_after_s
            )
            if jumped or stale:
                self._filter.reset()
            tip = self._filter(time_s, raw_tip)
        self._last_seen_s = time_s
        self._last_raw_tip = raw_tip

        angle = math.degrees(math.atan2(direction[1], direction[0])) % 180.0
        return InstrumentEstimate(
            tip_px=(float(tip[0]), float(tip[1])),
            raw_tip_px=(float(raw_tip[0]), float(raw_tip[1])),
            entry_px=(float(entry[0]), float(entry[1])),
            direction=(float(direction[0]), float(direction[1])),
            angle_deg=angle,
            length_mm=_mm(raw_tip[0] - entry[0], raw_tip[1] - entry[1], spacing),
            confidence=conf,
            trajectory_end_px=_ray_exit(tip, direction, w, h),
            centerline_px=centerline if centerline is not None else np.array([entry, raw_tip], np.float32),
        )

    @staticmethod
    def _main_instrument(
        inst: npt.NDArray[np.uint8], prob: npt.NDArray[np.float32] | None, n_contours: int
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Pixels of the instrument proper: the strongest component and the pieces that continue it.

        A label map can hold a needle and, apart from it, a fragment on a bright distractor or a bone
        surface. A line fitted through all of them (even a robust one) lands between the two and puts the
        tip on the wrong structure. So: take the component with the most evidence (pixels, weighted by
        the instrument probability when given), then add the other components that lie on its line (the
        pieces of a shaft broken by out-of-plane gaps) or start within a few pixels of its ends (the bent
        part of a catheter). Everything else stays in the contours but out of the geometry.
        """
        if n_contours <= 1:
            ys, xs = np.nonzero(inst)
            return ys, xs
        n, comp, stats, _ = cv2.connectedComponentsWithStats(inst, connectivity=8)
        if n <= 2:
            ys, xs = np.nonzero(inst)
            return ys, xs
        ys, xs = np.nonzero(comp)
        ids = comp[ys, xs]
        area: npt.NDArray[np.float64] = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        if prob is not None and prob.shape == inst.shape:
            evidence = np.bincount(ids, weights=prob[ys, xs].astype(np.float64), minlength=n).astype(
                np.float64
            )
        else:
            evidence = area.copy()
        evidence[0] = -1.0
        seed = int(np.argmax(evidence))
        in_seed = ids == seed
        sp = np.stack([xs[in_seed], ys[in_seed]], axis=1).astype(np.float32)
        if len(sp) < 6:
            return ys, xs
        vx, vy, cx, cy = (float(v) for v in cv2.fitLine(sp, cv2.DIST_L2, 0, 0.01, 0.01).ravel())
        along_seed = (sp[:, 0] - cx) * vx + (sp[:, 1] - cy) * vy
        ends = np.array(
            [
                [cx + along_seed.min() * vx, cy + along_seed.min() * vy],
                [cx + along_seed.max() * vx, cy + along_seed.max() * vy],
            ],
            dtype=np.float32,
        )
        width = max(3.0, 2.0 * float(np.median(np.abs((sp[:, 0] - cx) * -vy + (sp[:, 1] - cy) * vx))) + 2.0)
        keep = np.zeros(n, dtype=bool)
        keep[seed] = True
        pieces: dict[int, npt.NDArray[np.float32]] = {}
        for k in range(1, n):
            if k == seed or area[k] < 3:
                continue
            sel = ids == k
            px, py = xs[sel].astype(np.float32), ys[sel].astype(np.float32)
            perp = np.abs((px - cx) * -vy + (py - cy) * vx)
            colinear = float(np.median(perp)) <= width + 2.0
            gap = np.hypot(px[:, None] - ends[None, :, 0], py[:, None] - ends[None, :, 1]).min()
            keep[k] = colinear or float(gap) <= 8.0
            if not keep[k]:
                pieces[k] = np.stack([px, py], axis=1)
        if pieces:
            Interpreter._follow_tangents(sp, keep, pieces)
        sel = keep[ids]
        return ys[sel], xs[sel]

    @staticmethod
    def _follow_tangents(
        seed_pts: npt.NDArray[np.float32],
        keep: npt.NDArray[np.bool_],
        pieces: dict[int, npt.NDArray[np.float32]],
        reach_px: float = 100.0,
        cone_deg: float = 25.0,
    ) -> None:
        """Add to ``keep`` the pieces that continue a curved shaft across a gap, end after end.

        Where a catheter crosses the spine or a vessel its mask can break for tens of pixels, and the piece
        beyond (often the radio-opaque tip) is neither on the seed's straight line nor next to its end. A
        piece continues an end when its nearest pixel lies within ``reach_px`` of that end, within
        ``cone_deg`` of the end's outward tangent (fitted to the last ~15 px of the shaft) and no further
        from the tangent ray than ``max(8, 0.3 * gap)`` px (the cone narrows at long range: a catheter's
        bend over a gap of ``g`` px strays about ``g^2 / 2R`` from its tangent); the chain's end then moves
        to the far end of that piece, so several gaps can be bridged. A fragment off to the side (a bone
        edge, a vessel edge) lies outside and stays out.
        """
        cos_cone = math.cos(math.radians(cone_deg))
        mean = seed_pts.mean(axis=0)
        _, _, vt = np.linalg.svd(seed_pts - mean, full_matrices=False)
        axis = vt[0]
        along = (seed_pts - mean) @ axis
        for sign in (-1.0, 1.0):  # both ends of the seed
            pts, t = seed_pts, along * sign
            for _ in range(4):
                end_sel = t >= float(t.max()) - 15.0
                tail = pts[end_sel]
                end = pts[int(np.argmax(t))]
                if len(tail) >= 3:
                    c = tail.mean(axis=0)
                    _, _, tv = np.linalg.svd(tail - c, full_matrices=False)
                    d = tv[0]
                else:
                    d = axis
                outward = end - tail.mean(axis=0)
                if float(outward @ d) < 0.0:
                    d = -d
                best, best_gap = None, reach_px
                for k, q in pieces.items():
                    if keep[k]:
                        continue
                    rel = q - end
                    dist = np.hypot(rel[:, 0], rel[:, 1])
                    j = int(np.argmin(dist))
                    g = float(dist[j])
                    if g > best_gap or g == 0.0:
                        continue
                    fwd = float(rel[j] @ d)
                    lateral = abs(float(rel[j, 0] * d[1] - rel[j, 1] * d[0]))
                    if fwd / g >= cos_cone and lateral <= max(8.0, 0.3 * g):
                        best, best_gap = k, g
                if best is None:
                    break
                keep[best] = True
                pts = pieces[best]
                t = (pts - end) @ d  # the new piece's far end is the chain's new end
                if float(t.max()) <= 0.0:
                    break

    @staticmethod
    def _curved(
        pts: npt.NDArray[np.float32],
        t: npt.NDArray[np.float32],
        perp: npt.NDArray[np.float32],
        tol: float,
        a_is_entry: bool,
        *,
        heading_radius_px: float,
    ) -> tuple[Point, Point, Point, npt.NDArray[np.float32]]:
        """Entry, tip, local tip direction and an ordered centreline of a curved instrument mask."""
        span = float(t.max() - t.min())
        band = perp <= max(tol, 0.3 * span)
        p = pts[band]
        tt = t[band] if a_is_entry else -t[band]
        lo, hi = float(tt.min()), float(tt.max())
        near_tip = tt >= hi - 2.0
        near_entry = tt <= lo + 2.0
        tip = (float(p[near_tip, 0].mean()), float(p[near_tip, 1].mean()))
        entry = (float(p[near_entry, 0].mean()), float(p[near_entry, 1].mean()))
        bins = ((tt - lo) / 6.0).astype(np.intp)
        cnt = np.bincount(bins)
        keep = cnt > 0
        mx = np.bincount(bins, weights=p[:, 0])[keep] / cnt[keep]
        my = np.bincount(bins, weights=p[:, 1])[keep] / cnt[keep]
        line = np.vstack([[entry], np.stack([mx, my], axis=1)[1:-1], [tip]]).astype(np.float32)
        # local direction at the tip: from the centreline point ~10 px back; then re-find the tip as the
        # extreme of the pixels near it along that local direction (the chord's extreme is biased towards
        # the outside of the bend)
        back = line[:-1][np.hypot(line[:-1, 0] - tip[0], line[:-1, 1] - tip[1]) >= 10.0]
        ref = back[-1] if len(back) else line[0]
        dx, dy = tip[0] - float(ref[0]), tip[1] - float(ref[1])
        n = math.hypot(dx, dy) or 1.0
        near = np.hypot(p[:, 0] - tip[0], p[:, 1] - tip[1]) <= 12.0
        q = p[near]
        along = (q[:, 0] - tip[0]) * dx / n + (q[:, 1] - tip[1]) * dy / n
        ends = q[along >= float(along.max()) - 1.5]
        tip = (float(ends[:, 0].mean()), float(ends[:, 1].mean()))
        line[-1] = tip
        return entry, tip, _local_heading(p, tip, (dx / n, dy / n), heading_radius_px), line

    @staticmethod
    def _ray_hits(tgt: npt.NDArray[np.uint8], tip: Point, d: Point, w: int, h: int) -> bool:
        """Whether the projected path beyond the tip (1 px steps to the border) crosses the target mask."""
        end = _ray_exit(tip, d, w, h)
        n = int(math.hypot(end[0] - tip[0], end[1] - tip[1])) + 1
        s = np.arange(n, dtype=np.float32)
        xs = np.clip(np.rint(tip[0] + s * d[0]), 0, w - 1).astype(np.intp)
        ys = np.clip(np.rint(tip[1] + s * d[1]), 0, h - 1).astype(np.intp)
        return bool(tgt[ys, xs].any())


def _parabola_slope(u: npt.NDArray[np.float32], v: npt.NDArray[np.float32], at: float) -> tuple[float, float]:
    """Least-squares ``v = c0 + c1 u + c2 u²`` through the points: (slope at ``u = at``, ``c2``)."""
    a = np.stack([np.ones_like(u), u, u * u], axis=1).astype(np.float64)
    coef = np.linalg.lstsq(a, v.astype(np.float64), rcond=None)[0]
    return float(coef[1] + 2.0 * coef[2] * at), float(coef[2])


def _turned(d: Point, slope: float) -> Point:
    """``d`` turned towards its left normal by ``slope`` (the direction of ``(1, slope)`` in d's frame)."""
    x, y = d[0] - slope * d[1], d[1] + slope * d[0]
    n = math.hypot(x, y)
    return (x / n, y / n)


def _bent_heading(
    pts: npt.NDArray[np.float32], entry: Point, tip: Point, d: Point, min_sagitta: float
) -> Point:
    """Heading at the tip of a shaft the line fit took as straight (``d``: its line, entry -> tip).

    A parabola is fitted to the shaft's pixels in the chord's frame. When it bows less than
    ``min_sagitta`` px from the chord (a needle, or a bend too small to tell from the mask's ragged
    edges) the line stands; otherwise the heading is the parabola's slope at the tip.
    """
    ex, ey = entry
    cx, cy = tip[0] - ex, tip[1] - ey
    length = math.hypot(cx, cy)
    if length < 10.0:
        return d
    ax, ay = cx / length, cy / length
    rx, ry = pts[:, 0] - np.float32(ex), pts[:, 1] - np.float32(ey)
    u = rx * np.float32(ax) + ry * np.float32(ay)
    v = ry * np.float32(ax) - rx * np.float32(ay)  # along the chord's left normal (-ay, ax)
    band = np.abs(v) <= max(6.0, 0.3 * length)
    if int(band.sum()) < 10:
        return d
    slope, c2 = _parabola_slope(u[band], v[band], length)
    if abs(c2) * (length / 2.0) ** 2 < min_sagitta:
        return d
    return _turned((ax, ay), slope)


def _local_heading(pts: npt.NDArray[np.float32], tip: Point, d: Point, radius: float) -> Point:
    """Heading at the tip of a curved shaft: the slope at the tip of a parabola fitted to the pixels within
    ``radius`` of it, in the frame of ``d`` (a first estimate of the heading). ``d`` itself where there are too few
    such pixels, or they span too little of the radius to fit."""
    rx, ry = pts[:, 0] - np.float32(tip[0]), pts[:, 1] - np.float32(tip[1])
    near = rx * rx + ry * ry <= np.float32(radius * radius)
    if int(near.sum()) < 8:
        return d
    rx, ry = rx[near], ry[near]
    u = rx * np.float32(d[0]) + ry * np.float32(d[1])
    v = ry * np.float32(d[0]) - rx * np.float32(d[1])
    if float(u.max() - u.min()) < 0.5 * radius:
        return d
    slope, _ = _parabola_slope(u, v, float(u.max()))
    return _turned(d, slope)
