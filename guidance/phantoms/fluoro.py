"""X-ray fluoroscopy phantom: Beer-Lambert projection of anatomy, quantum noise, a needle or catheter.

Model (a pure function of ``(seed, frame index)``):

* **Static anatomy** (once per sequence): a map of line integrals ``sum(mu * length)`` over soft tissue
  (a body outline with smooth thickness variation), a spine (vertebral bodies with pedicles and discs),
  ribs (curved bands), vessels (tubes along smooth random curves; contrast-filled ones attenuate more),
  and the target: a round lesion or a highlighted vessel segment.
* **Per frame**: the anatomy shifts with breathing; the instrument is added to the line integrals: a
  straight biopsy needle, or a curved catheter / guidewire following a spline, each with a radio-opaque tip
  marker, advancing and withdrawing over time. Detected intensity ``I = I0 * exp(-line integral)`` with
  ``I0`` set by the dose, blurred by the focal spot / detector, Poisson quantum noise (Gaussian
  approximation with a precomputed bank of normal fields, so a frame costs ~1-2 ms), collimator shutters
  outside which almost nothing arrives, then log-scaled to 8 bits or linearly to 16 bits.

The instrument is darker than its surroundings (high attenuation), the opposite polarity to ultrasound.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from engines.base import INSTRUMENT, TARGET
from guidance.phantoms.base import (
    Modality,
    PhantomFrame,
    PointF,
    axis_angle_deg,
    fill_polygon,
    fill_segment,
    insertion_cycle,
    irregular_blob,
)

logger = logging.getLogger(__name__)

InstrumentKind = Literal["needle", "catheter", "guidewire"]
FluoroTarget = Literal["lesion", "vessel", "none"]
_NOISE_BANK = 4


@dataclass(frozen=True, slots=True)
class FluoroConfig:
    """One simulated fluoroscopy sequence (positions as fractions of the image size)."""

    dose_photons: float = 800.0  # mean detected quanta per pixel behind ~no anatomy
    blur_px: float = 0.8
    body_mu: float = 1.6  # soft tissue line integral at the body's thickest
    spine: bool = True
    spine_x_frac: float = 0.5
    n_ribs: int = 3
    n_vessels: int = 2
    vessel_mu: float = 0.25
    collimator: Literal["none", "rect", "iris"] = "rect"
    collimator_margin_frac: float = 0.06
    # instrument
    instrument: bool = True
    instrument_kind: InstrumentKind = "needle"
    instrument_width_px: float = 2.5
    instrument_mu: float = 1.2
    tip_marker_mu: float = 2.0
    entry_side: Literal["left", "right", "top", "bottom"] = "left"
    curvature: float = 0.0  # catheter bend (fraction of its length)
    lead_in_s: float = 0.4
    cycle_s: float = 8.0
    # target
    target_kind: FluoroTarget = "lesion"
    target_center_frac: tuple[float, float] = (0.6, 0.55)
    target_radius_px: float = 14.0
    target_mu: float = 0.35
    aim_offset_px: float = 0.0
    # motion
    breathing_amp_px: float = 3.0
    breathing_period_s: float = 4.0

    @classmethod
    def sample(cls, seed: int, **overrides: Any) -> FluoroConfig:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xF1E0])
        kind_draw = rng.uniform()
        kind: InstrumentKind = (
            "needle" if kind_draw < 0.45 else "catheter" if kind_draw < 0.8 else "guidewire"
        )
        tdraw = rng.uniform()
        target: FluoroTarget = "lesion" if tdraw < 0.55 else "vessel" if tdraw < 0.9 else "none"
        radius = float(rng.uniform(8.0, 22.0))
        cfg = cls(
            dose_photons=float(np.exp(rng.uniform(np.log(150.0), np.log(4000.0)))),
            blur_px=float(rng.uniform(0.5, 1.3)),
            body_mu=float(rng.uniform(1.0, 2.5)),
            spine=rng.uniform() < 0.7,
            spine_x_frac=float(rng.uniform(0.3, 0.7)),
            n_ribs=int(rng.integers(0, 6)),
            n_vessels=int(rng.integers(0, 4)),
            vessel_mu=float(rng.uniform(0.1, 0.5)),
            collimator=("none", "rect", "iris")[int(rng.integers(0, 3))],
            collimator_margin_frac=float(rng.uniform(0.02, 0.1)),
            instrument=rng.uniform() < 0.93,
            instrument_kind=kind,
            instrument_width_px=float(rng.uniform(2.0, 3.5) if kind == "needle" else rng.uniform(1.5, 3.0)),
            instrument_mu=float(rng.uniform(0.6, 2.0)),
            tip_marker_mu=float(rng.uniform(1.5, 3.0)),
            entry_side=("left", "right", "top", "bottom")[int(rng.integers(0, 4))],
            curvature=0.0 if kind == "needle" else float(rng.uniform(-0.35, 0.35)),
            lead_in_s=float(rng.uniform(0.2, 1.2)),
            cycle_s=float(rng.uniform(6.0, 12.0)),
            target_kind=target,
            target_center_frac=(float(rng.uniform(0.35, 0.7)), float(rng.uniform(0.35, 0.7))),
            target_radius_px=radius,
            # A lesion one is guided to is one that can be seen: 0.2-0.4 (10-13 grey levels of 255 on the
            # log display) sat inside the quantum noise at low dose and on the spine; 0.4-0.8 keeps the
            # faintest one at a contrast-to-noise ratio of about 1.4 per pixel at the lowest dose.
            target_mu=float(rng.uniform(0.4, 0.8)),
            aim_offset_px=0.0
            if rng.uniform() < 0.6
            else float(rng.choice([-1.0, 1.0]) * rng.uniform(1.3, 2.5) * radius),
            breathing_amp_px=float(rng.uniform(0.0, 5.0)),
            breathing_period_s=float(rng.uniform(3.0, 6.0)),
        )
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def insertion_fraction(self, t: float) -> float:
        """Advance 0 -> 1, partial withdraw and re-advance, full withdraw, pause (0 = not in view)."""
        if not self.instrument:
            return 0.0
        return insertion_cycle(t, self.lead_in_s, self.cycle_s, (0.5, 0.6, 0.68, 0.78, 0.92), 0.4)


def _smooth_curve(
    rng: np.random.Generator, p0: PointF, p1: PointF, bend: float, n: int = 64
) -> npt.NDArray[np.float64]:
    """A smooth curve p0 -> p1 bowed sideways by ``bend`` (fraction of its length), plus a gentle wiggle."""
    s = np.linspace(0.0, 1.0, n)
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    d = b - a
    nrm = np.array([-d[1], d[0]])
    wiggle = rng.uniform(-0.03, 0.03) * np.sin(2 * np.pi * s * rng.uniform(1.0, 2.5))
    off = (bend * 4.0 * s * (1 - s) + wiggle)[:, None] * nrm[None, :]
    return np.asarray(a[None, :] + s[:, None] * d[None, :] + off, dtype=np.float64)


def _draw_polyline(
    dst: npt.NDArray[np.float32], pts: npt.NDArray[np.float64], width: float, value: float
) -> None:
    ip = np.round(pts * 16.0).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(dst, [ip], False, value, max(1, round(width)), cv2.LINE_8, 4)


def _draw_shaft(dst: npt.NDArray[np.float32], pts: npt.NDArray[np.float64], width: float) -> None:
    """Polyline of ``width`` whose far end is flat exactly at the last point (the tip), not a round cap."""
    if len(pts) > 2:
        _draw_polyline(dst, pts[:-1], width, 1.0)
    a = (float(pts[-2, 0]), float(pts[-2, 1]))
    b = (float(pts[-1, 0]), float(pts[-1, 1]))
    fill_segment(dst, a, b, width, 1.0)


class FluoroPhantom:
    """Deterministic simulated fluoroscopy sequence; ``frame(i)`` is random access.

    Args:
        seed: selects the sequence.
        width, height: image size.
        fps: frame rate.
        bit_depth: 8 (uint8, log-scaled display image) or 16 (uint16, linear detector signal).
        spacing_mm: detector pixel spacing at the isocentre.
        config: full configuration (None: drawn from the seed); ``**overrides`` replace fields.
    """

    modality: Modality = "fluoro"

    def __init__(  # noqa: PLR0917 - positional signature shared with UltrasoundPhantom
        self,
        seed: int = 0,
        width: int = 256,
        height: int = 256,
        fps: float = 15.0,
        bit_depth: int = 8,
        spacing_mm: tuple[float, float] = (0.3, 0.3),
        config: FluoroConfig | None = None,
        **overrides: Any,
    ) -> None:
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
        if width < 32 or height < 32:
            raise ValueError(f"phantom size must be at least 32x32, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.seed = int(seed)
        self.width, self.height = int(width), int(height)
        self.fps = float(fps)
        self.bit_depth = bit_depth
        self.spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]))
        base = config if config is not None else FluoroConfig.sample(self.seed)
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self._pad = math.ceil(self.config.breathing_amp_px) + 2
        self._build_static()

    def _build_static(self) -> None:
        cfg = self.config
        w, h, pad = self.width, self.height, self._pad
        hp, wp = h + 2 * pad, w + 2 * pad
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xF1A7])
        yy = np.arange(hp, dtype=np.float32)[:, None] - pad
        xx = np.arange(wp, dtype=np.float32)[None, :] - pad
        # soft tissue: an elliptical body, thickest in the middle, with smooth lumps
        cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
        ax, ay = rng.uniform(0.6, 1.0) * w, rng.uniform(0.7, 1.2) * h
        r2 = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
        mu = (cfg.body_mu * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))).astype(np.float32)
        lumps = cv2.GaussianBlur(rng.standard_normal((hp, wp)).astype(np.float32), (0, 0), w / 12.0)
        mu += 0.15 * cfg.body_mu * lumps / max(float(np.abs(lumps).max()), 1e-6)
        # ribs: curved bands
        for _ in range(cfg.n_ribs):
            y0 = rng.uniform(0.05, 0.95) * h
            curve = y0 + rng.uniform(0.0008, 0.003) * (xx - rng.uniform(0.2, 0.8) * w) ** 2 * rng.choice(
                [-1, 1]
            )
            band = np.exp(-0.5 * ((yy - curve) / rng.uniform(2.5, 5.0)) ** 2)
            mu += (rng.uniform(0.2, 0.45) * band).astype(np.float32)
        # spine: vertebral bodies (rounded rectangles) separated by discs, with pedicle rings
        if cfg.spine:
            sx = cfg.spine_x_frac * w
            vh = rng.uniform(0.12, 0.2) * h
            vw = rng.uniform(0.18, 0.28) * w
            layer = np.zeros((hp, wp), np.float32)
            y = -vh + rng.uniform(0, vh)
            while y < h + vh:
                x0, x1 = sx - vw / 2 + pad, sx + vw / 2 + pad
                cv2.rectangle(
                    layer, (round(x0), round(y + pad)), (round(x1), round(y + pad + vh * 0.8)), 1.0, -1
                )
                for px in (x0 + vw * 0.2, x1 - vw * 0.2):
                    cv2.ellipse(
                        layer,
                        (round(px), round(y + pad + vh * 0.3)),
                        (round(vw * 0.08), round(vh * 0.15)),
                        0,
                        0,
                        360,
                        0.6,
                        2,
                    )
                y += vh
            mu += rng.uniform(0.6, 1.1) * cv2.GaussianBlur(layer, (0, 0), 2.0)
        # vessels
        for _ in range(cfg.n_vessels):
            p0 = (rng.uniform(-0.1, 1.1) * w + pad, -5.0 + pad)
            p1 = (rng.uniform(-0.1, 1.1) * w + pad, h + 5.0 + pad)
            curve = _smooth_curve(rng, p0, p1, rng.uniform(-0.3, 0.3))
            layer = np.zeros((hp, wp), np.float32)
            _draw_polyline(layer, curve, rng.uniform(3, 8), 1.0)
            mu += cfg.vessel_mu * cv2.GaussianBlur(layer, (0, 0), 1.0)
        # target: a lesion, or a contrast-filled vessel segment (1.5 x the lesion attenuation, so at least
        # 0.6: more opaque than any background vessel, whose attenuation is at most 0.5)
        base_labels = np.zeros((hp, wp), np.uint8)
        tc = (cfg.target_center_frac[0] * w, cfg.target_center_frac[1] * h)
        self._target_center = tc
        if cfg.target_kind == "lesion":
            outline = irregular_blob(rng, cfg.target_radius_px, 0.3) + np.array([tc[0] + pad, tc[1] + pad])
            fill_polygon(base_labels, outline, TARGET)
            mu += cfg.target_mu * cv2.GaussianBlur((base_labels == TARGET).astype(np.float32), (0, 0), 1.5)
        elif cfg.target_kind == "vessel":
            ang = rng.uniform(0, np.pi)
            half = cfg.target_radius_px * 2.0
            p0 = (tc[0] + pad - half * math.cos(ang), tc[1] + pad - half * math.sin(ang))
            p1 = (tc[0] + pad + half * math.cos(ang), tc[1] + pad + half * math.sin(ang))
            seg = _smooth_curve(rng, p0, p1, rng.uniform(-0.2, 0.2))
            lab = np.zeros((hp, wp), np.float32)
            _draw_polyline(lab, seg, max(4.0, cfg.target_radius_px * 0.5), 1.0)
            base_labels[lab > 0] = TARGET
            mu += cfg.target_mu * 1.5 * cv2.GaussianBlur(lab, (0, 0), 1.0)
        self._mu = mu.astype(np.float32)
        self._base_labels = base_labels
        self._target_area = float(np.count_nonzero(base_labels == TARGET))

        # collimator (fixed to the detector, not moving with anatomy)
        field = np.ones((h, w), np.float32)
        m = cfg.collimator_margin_frac
        if cfg.collimator == "rect":
            field[:] = 0.0
            field[
                round(m * h) : h - round(m * h * rng.uniform(0.5, 1.5)),
                round(m * w * rng.uniform(0.5, 1.5)) : w - round(m * w),
            ] = 1.0
        elif cfg.collimator == "iris":
            gy, gx = np.mgrid[0:h, 0:w]
            r = min(w, h) * (0.5 + 1.5 * m)
            field = (np.hypot(gx - (w - 1) / 2, gy - (h - 1) / 2) <= r).astype(np.float32)
        self._field = cv2.GaussianBlur(field, (0, 0), 1.5) * 0.97 + 0.03  # shutters leak a little
        self._outside = field < 0.5
        self._noise = [rng.standard_normal((h, w)).astype(np.float32) for _ in range(_NOISE_BANK)]
        self._build_instrument_path(rng)

    def _build_instrument_path(self, rng: np.random.Generator) -> None:
        """The instrument's full path (N, 2) in image coordinates, from outside the image to the aim point."""
        cfg = self.config
        w, h = self.width, self.height
        aim = np.array(self._target_center, float)
        side = cfg.entry_side
        start = {
            "left": (-10.0, rng.uniform(0.1, 0.9) * h),
            "right": (w + 10.0, rng.uniform(0.1, 0.9) * h),
            "top": (rng.uniform(0.1, 0.9) * w, -10.0),
            "bottom": (rng.uniform(0.1, 0.9) * w, h + 10.0),
        }[side]
        d = aim - np.asarray(start)
        nrm = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-6)
        aim = aim + cfg.aim_offset_px * nrm
        if cfg.instrument_kind == "needle":  # a biopsy needle is straight
            path = np.linspace(np.asarray(start, float), aim, 200)
        else:
            path = _smooth_curve(rng, start, (float(aim[0]), float(aim[1])), cfg.curvature, n=200)
        seg = np.diff(path, axis=0)
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
        inside = (path[:, 0] >= 0) & (path[:, 0] <= w - 1) & (path[:, 1] >= 0) & (path[:, 1] <= h - 1)
        inside &= ~self._outside[
            np.clip(np.round(path[:, 1]).astype(int), 0, h - 1),
            np.clip(np.round(path[:, 0]).astype(int), 0, w - 1),
        ]
        idx = np.flatnonzero(inside)
        self._path = path
        self._arc = arc
        self._arc_entry = float(arc[idx[0]]) if idx.size else math.inf
        self._arc_end = float(arc[-1])

    def _point_at(self, s: float) -> PointF:
        x = float(np.interp(s, self._arc, self._path[:, 0]))
        y = float(np.interp(s, self._arc, self._path[:, 1]))
        return (x, y)

    def frame(self, index: int) -> PhantomFrame:
        if index < 0:
            raise IndexError(f"frame index must be >= 0, got {index}")
        cfg = self.config
        w, h, pad = self.width, self.height, self._pad
        t = index / self.fps
        oy = round(cfg.breathing_amp_px * math.sin(2 * math.pi * t / cfg.breathing_period_s))
        ox = round(0.3 * cfg.breathing_amp_px * math.sin(2 * math.pi * t / cfg.breathing_period_s + 0.5))
        y0, x0 = pad + oy, pad + ox
        mu = self._mu[y0 : y0 + h, x0 : x0 + w].copy()
        labels = self._base_labels[y0 : y0 + h, x0 : x0 + w].copy()
        centroid: PointF | None = None
        if self._target_area > 0:
            m = cv2.moments((labels == TARGET).view(np.uint8), binaryImage=True)
            if m["m00"] > 0:
                centroid = (m["m10"] / m["m00"], m["m01"] / m["m00"])

        frac = cfg.insertion_fraction(t)
        tip: PointF | None = None
        entry: PointF | None = None
        heading: float | None = None  # the path's tangent at the tip
        centerline: npt.NDArray[np.float32] | None = None
        if math.isfinite(self._arc_entry):
            s_tip = self._arc_entry + frac * (self._arc_end - self._arc_entry)
            if frac > 0 and s_tip - self._arc_entry >= 4.0:
                s = np.concatenate([self._arc[(self._arc > 0) & (self._arc < s_tip)], [s_tip]])
                pts = np.stack(
                    [np.interp(s, self._arc, self._path[:, 0]), np.interp(s, self._arc, self._path[:, 1])], 1
                )
                layer = np.zeros((h, w), np.float32)
                tip = self._point_at(s_tip)
                back = self._point_at(s_tip - 2.0)  # the path's last ~1.5 px segment
                heading = axis_angle_deg((tip[0] - back[0], tip[1] - back[1]))
                _draw_shaft(layer, pts, cfg.instrument_width_px)
                lab_layer = layer > 0
                mu += cfg.instrument_mu * layer
                # radio-opaque tip marker: the last few px attenuate much more
                s_mark = max(0.0, s_tip - 3.0 * cfg.instrument_width_px)
                mark = pts[s >= s_mark]
                if len(mark) >= 2:
                    mlayer = np.zeros((h, w), np.float32)
                    _draw_shaft(mlayer, mark, cfg.instrument_width_px)
                    mu += cfg.tip_marker_mu * mlayer
                    lab_layer |= mlayer > 0
                labels[lab_layer] = INSTRUMENT
                entry = self._point_at(self._arc_entry)
                vis = pts[s >= self._arc_entry]
                centerline = np.vstack([[entry], vis]).astype(np.float32)

        intensity = cfg.dose_photons * np.exp(-mu) * self._field
        intensity = np.asarray(cv2.GaussianBlur(intensity, (0, 0), cfg.blur_px), dtype=np.float32)
        noise = self._noise[(index * 2654435761 + self.seed) % _NOISE_BANK]
        counts = intensity + np.sqrt(intensity) * noise  # Poisson, Gaussian approximation
        np.maximum(counts, 0.0, out=counts)
        if self.bit_depth == 16:
            image: npt.NDArray[np.generic] = np.clip(counts * (40000.0 / cfg.dose_photons), 0, 65535).astype(
                np.uint16
            )
        else:
            logc = np.log1p(counts) / math.log1p(cfg.dose_photons * 1.2)
            image = np.clip(logc * 255.0, 0, 255).astype(np.uint8)
        labels[self._outside] = 0
        present = tip is not None and bool(np.any(labels == INSTRUMENT))
        if not present:
            tip = entry = None
            centerline = None
            heading = None
        axis = (
            axis_angle_deg((tip[0] - entry[0], tip[1] - entry[1]))
            if tip is not None and entry is not None
            else None
        )
        return PhantomFrame(
            index=index,
            time_s=t,
            image=image,
            labels=labels,
            instrument_present=present,
            tip_px=tip,
            entry_px=entry,
            axis_angle_deg=axis,
            tip_direction_deg=heading,
            target_centroid_px=centroid,
            target_radius_px=math.sqrt(self._target_area / math.pi),
            spacing_mm=self.spacing_mm,
            modality="fluoro",
            centerline_px=centerline,
        )

    def __iter__(self) -> Iterator[PhantomFrame]:
        i = 0
        while True:
            yield self.frame(i)
            i += 1

    def frames(self, count: int, start: int = 0) -> Iterator[PhantomFrame]:
        for i in range(start, start + count):
            yield self.frame(i)
