"""B-mode ultrasound phantom: speckle from scatterers, tissue layers, a lesion, and a needle being inserted.

Model (all of it a pure function of ``(seed, frame index)``):

* **Static tissue** (computed once per sequence, in the probe's *beam* frame - rows = depth): a complex
  Gaussian scatterer field, scaled by a layered echogenicity map, convolved with an anisotropic point-spread
  function (short axially, wide laterally); its envelope is Rayleigh distributed (fully developed speckle).
  Layers have wavy interfaces with specular bright lines. The lesion (hypo-, hyper- or iso-echoic, with an
  irregular border), an optional bone-like bright surface with an acoustic shadow, and needle-like
  distractors (bright straight fascia lines that never enter from the edge) are baked into the same map;
  point reflectors (wire rows or calcifications, only when asked for) are added to the scatterer field.
  Everything is log-compressed once into display units.
* **Per frame** (< ~1 ms at 256x256): the tissue field is cropped at the breathing / probe-motion offset,
  depth attenuation and time-gain compensation (an imperfect match, so bands remain) are added as a row
  profile, curvilinear probes are scan-converted with a precomputed ``cv2.remap`` map, then the needle is
  composed: a bright specular shaft whose brightness falls with insertion angle, reverberation copies
  below it, an acoustic shadow along the beam direction, segments missing while it is out of plane.
* The needle follows a schedule of absent -> advance -> partial withdraw -> re-advance -> withdraw, so
  sequences contain frames without any needle; some sequences have no needle at all.

A :class:`UltrasoundConfig` (frozen) describes one sequence; :meth:`UltrasoundConfig.sample` draws one from
the seed, so training and evaluation can draw varied, held-out sequences by seed. Keyword overrides given to
:class:`UltrasoundPhantom` replace sampled fields (e.g. ``geometry="linear", n_distractors=0``).
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
    DRAW_SHIFT,
    Modality,
    PhantomFrame,
    PointF,
    axis_angle_deg,
    fill_polygon,
    fill_segment,
    fixed,
    insertion_cycle,
    irregular_blob,
)

logger = logging.getLogger(__name__)

Geometry = Literal["linear", "curvilinear"]
TargetKind = Literal["hypo", "hyper", "iso", "none"]

_NOISE_BANK = 4

#: Echogenicity factor (intensity inside / outside) drawn per lesion kind. Hyperechoic: +6 to +10 dB; a
#: factor of 2-3.5 (+3 to +5 dB) sat inside one speckle standard deviation (~5.6 dB for fully developed
#: speckle) and was invisible, while real hyperechoic lesions are not.
TARGET_CONTRAST: dict[str, tuple[float, float]] = {
    "hypo": (0.08, 0.35),
    "hyper": (4.0, 10.0),
    "iso": (0.85, 1.15),
}


@dataclass(frozen=True, slots=True)
class UltrasoundConfig:
    """Everything that makes one simulated ultrasound sequence differ from another.

    Positions are fractions of the image size (so a config scales with the image); lengths in pixels.
    """

    geometry: Geometry = "linear"
    sector_half_angle_deg: float = 32.0  # curvilinear only
    apex_offset_frac: float = 0.3  # curvilinear: probe radius as a fraction of the height
    dynamic_range_db: float = 50.0
    gain_db: float = 0.0
    attenuation_db_per_px: float = 0.08  # round-trip attenuation
    tgc_mismatch: float = 0.1  # TGC compensates attenuation * (1 - mismatch)
    tgc_ripple_db: float = 2.0
    n_layers: int = 3
    psf_axial_px: float = 0.8
    psf_lateral_px: float = 1.8
    noise_db: float = 1.5
    # needle
    needle: bool = True
    needle_side: Literal["left", "right"] = "left"
    needle_angle_deg: float = 35.0  # below horizontal
    needle_width_px: float = 3.0
    needle_brightness_db: float = 32.0  # above tissue, for a needle perpendicular to the beam
    reverb_count: int = 3
    reverb_spacing_px: float = 4.0
    shadow_db: float = 3.0
    aim_offset_px: float = 0.0  # perpendicular miss distance of the needle's path from the lesion centre
    overshoot_frac: float = 0.0  # how far past the aim point (in lesion radii) the tip goes at full depth
    lead_in_s: float = 0.5
    cycle_s: float = 8.0
    out_of_plane_frac: float = 0.0  # fraction of time a shaft segment is out of plane
    oop_period_s: float = 3.0
    # lesion
    target_kind: TargetKind = "hypo"
    target_center_frac: tuple[float, float] = (0.55, 0.6)
    target_radius_px: float = 18.0
    target_irregularity: float = 0.3
    target_contrast: float = 0.2  # echogenicity factor inside the lesion
    # Iso-echoic lesions are found by their hypoechoic halo (a compressed-tissue or capsule rim): a band
    # ``halo_px`` wide around the border at echogenicity ``halo_factor``. Ignored for other kinds.
    halo_px: float = 5.0
    halo_factor: float = 0.06
    # distractors
    bone: bool = False
    n_distractors: int = 0
    # Point reflectors: wire cross-sections (a calibration phantom's rows of wires) or calcifications,
    # bright compact echoes with a short ring-down tail below. Not drawn by :meth:`sample` (0), so every
    # sampled sequence is as it was; training forces them in as hard negatives. ``point_layout`` "rows"
    # lines them up like an N-wire phantom, "scatter" spreads them like calcifications.
    n_point_reflectors: int = 0
    point_layout: Literal["rows", "scatter"] = "scatter"
    # A water tank (a wire phantom's bath): the tissue's echo is lowered by this many dB everywhere, so the
    # frame is black except for the reflectors, the needle and the noise. The reflectors and the needle
    # keep their level relative to the tissue the gain was set for. 0 (never drawn by :meth:`sample`): tissue.
    water_bath_db: float = 0.0
    # Straight specular reflectors that float in the field without reaching its border: a wire lying in the
    # image plane, the edge of a phantom's plate. Bright lines 40-140 px long, within 25 degrees of
    # horizontal, with a reverberation tail, as a needle has. A needle enters from the border; these do
    # not, like the distractor lines in tissue. Meant for water baths (the end of the real N-wire
    # recording shows one, which models took for a needle); they do not avoid a lesion. Not drawn by
    # :meth:`sample` (0).
    n_line_reflectors: int = 0
    # Curved specular walls inside the field with no shadow under them: the wall of a bladder, a vessel or a
    # cyst (a fluid cavity, dark inside, brighter below: posterior enhancement) or an open bowl-shaped
    # interface. Brightest where the wall faces the beam, but the steep flanks still echo, and a stretch of a
    # large one is nearly straight: models took such a flank on a real curvilinear frame for a needle.
    # Not drawn by :meth:`sample` (0), so every sampled sequence is as it was; training forces them in.
    n_curved_walls: int = 0
    # motion
    breathing_amp_px: float = 3.0
    breathing_period_s: float = 4.0
    probe_amp_px: float = 1.0
    probe_period_s: float = 7.0

    @classmethod
    def sample(cls, seed: int, **overrides: Any) -> UltrasoundConfig:
        """Draw a varied configuration from ``seed`` (then apply ``overrides``)."""
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xC0F16])
        kind_draw = rng.uniform()
        target_kind: TargetKind = (
            "hypo"
            if kind_draw < 0.6
            else "hyper"
            if kind_draw < 0.8
            else "iso"
            if kind_draw < 0.95
            else "none"
        )
        # One draw per kind, in this order, whichever kind was drawn (keeps every seed's later fields fixed).
        drawn = {k: float(rng.uniform(*TARGET_CONTRAST[k])) for k in ("hypo", "hyper", "iso")}
        contrast = drawn.get(target_kind, 1.0)
        radius = float(rng.uniform(10.0, 26.0))
        on_path = rng.uniform() < 0.6
        cfg = cls(
            geometry="linear" if rng.uniform() < 0.6 else "curvilinear",
            sector_half_angle_deg=float(rng.uniform(28.0, 38.0)),
            apex_offset_frac=float(rng.uniform(0.2, 0.4)),
            dynamic_range_db=float(rng.uniform(45.0, 60.0)),
            gain_db=float(rng.uniform(-3.0, 3.0)),
            attenuation_db_per_px=float(rng.uniform(0.04, 0.12)),
            tgc_mismatch=float(rng.uniform(-0.15, 0.3)),
            tgc_ripple_db=float(rng.uniform(0.5, 3.0)),
            n_layers=int(rng.integers(2, 6)),
            psf_axial_px=float(rng.uniform(0.6, 1.2)),
            psf_lateral_px=float(rng.uniform(1.2, 2.6)),
            noise_db=float(rng.uniform(0.5, 2.5)),
            needle=rng.uniform() < 0.93,
            needle_side="left" if rng.uniform() < 0.5 else "right",
            needle_angle_deg=float(
                rng.uniform(15.0, 70.0) if rng.uniform() < 0.25 else rng.uniform(20.0, 55.0)
            ),
            needle_width_px=float(rng.uniform(2.0, 4.0)),
            needle_brightness_db=float(rng.uniform(28.0, 40.0)),
            reverb_count=int(rng.integers(1, 5)),
            reverb_spacing_px=float(rng.uniform(3.0, 6.0)),
            shadow_db=float(rng.uniform(1.5, 5.0)),
            aim_offset_px=0.0 if on_path else float(rng.choice([-1.0, 1.0]) * rng.uniform(1.3, 2.5) * radius),
            overshoot_frac=float(rng.uniform(-0.6, 0.3)),
            lead_in_s=float(rng.uniform(0.2, 1.2)),
            cycle_s=float(rng.uniform(6.0, 12.0)),
            out_of_plane_frac=float(rng.uniform(0.1, 0.4)) if rng.uniform() < 0.3 else 0.0,
            oop_period_s=float(rng.uniform(2.0, 5.0)),
            target_kind=target_kind,
            target_center_frac=(float(rng.uniform(0.4, 0.75)), float(rng.uniform(0.45, 0.8))),
            target_radius_px=radius,
            target_irregularity=float(rng.uniform(0.0, 0.6)),
            target_contrast=float(contrast),
            bone=rng.uniform() < 0.25,
            n_distractors=int(rng.integers(0, 3)) if rng.uniform() < 0.5 else 0,
            breathing_amp_px=float(rng.uniform(0.0, 5.0)),
            breathing_period_s=float(rng.uniform(3.0, 6.0)),
            probe_amp_px=float(rng.uniform(0.0, 2.5)),
            probe_period_s=float(rng.uniform(5.0, 11.0)),
        )
        # Drawn last so that every earlier field of every seed is unchanged by their introduction.
        cfg = dataclasses.replace(
            cfg, halo_px=float(rng.uniform(4.0, 7.0)), halo_factor=float(rng.uniform(0.03, 0.1))
        )
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def insertion_fraction(self, t: float) -> float:
        """Needle depth as a fraction of its full depth at time ``t`` (0: no needle in view)."""
        if not self.needle:
            return 0.0
        return insertion_cycle(t, self.lead_in_s, self.cycle_s, (0.55, 0.65, 0.72, 0.8, 0.92), 0.35)


class UltrasoundPhantom:
    """Deterministic simulated B-mode sequence; ``frame(i)`` is random access, iteration is endless.

    Args:
        seed: selects the sequence (its :class:`UltrasoundConfig` and its speckle).
        width, height: image size in pixels.
        fps: frame rate; ``frame(i).time_s == i / fps``.
        spacing_mm: pixel spacing ``(x, y)``.
        config: a full configuration; None draws one from ``seed``.
        **overrides: fields of :class:`UltrasoundConfig` replacing the drawn (or given) ones.
    """

    modality: Modality = "us"

    def __init__(  # noqa: PLR0917 - the brief's positional signature
        self,
        seed: int = 0,
        width: int = 256,
        height: int = 256,
        fps: float = 30.0,
        spacing_mm: tuple[float, float] = (0.2, 0.2),
        config: UltrasoundConfig | None = None,
        **overrides: Any,
    ) -> None:
        if width < 32 or height < 32:
            raise ValueError(f"phantom size must be at least 32x32, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.seed = int(seed)
        self.width = int(width)
        self.height = int(height)
        self.fps = float(fps)
        self.spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]))
        base = config if config is not None else UltrasoundConfig.sample(self.seed)
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self._pad = math.ceil(max(self.config.breathing_amp_px, self.config.probe_amp_px)) + 2
        self._build_static()

    # ------------------------------------------------------------------ static precomputation
    def _build_static(self) -> None:
        cfg = self.config
        w, h, pad = self.width, self.height, self._pad
        hp, wp = h + 2 * pad, w + 2 * pad
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x57A71C])
        yy = np.arange(hp, dtype=np.float32)[:, None] - pad
        xx = np.arange(wp, dtype=np.float32)[None, :] - pad

        # Layered echogenicity with wavy interfaces; interfaces are specular (bright thin lines).
        echo = np.full((hp, wp), 0.8, dtype=np.float32)
        depths = np.sort(rng.uniform(0.06, 0.9, size=cfg.n_layers)) * h
        levels = rng.uniform(0.35, 1.0, size=cfg.n_layers + 1).astype(np.float32)
        echo[:] = levels[0]
        for k, d in enumerate(depths):
            amp, period, phase = rng.uniform(1, 6), rng.uniform(0.6, 2.5) * w, rng.uniform(0, 2 * np.pi)
            boundary = d + amp * np.sin(2 * np.pi * xx / period + phase)
            below = yy >= boundary
            echo = np.where(below, levels[k + 1], echo).astype(np.float32)
            echo += (rng.uniform(1.5, 4.0) * np.exp(-0.5 * ((yy - boundary) / 0.9) ** 2)).astype(np.float32)

        # Lesion (in tissue coordinates, so it moves with breathing and probe motion).
        base_labels = np.zeros((hp, wp), dtype=np.uint8)
        cx, cy = cfg.target_center_frac[0] * w, cfg.target_center_frac[1] * h
        if cfg.needle_side == "right":
            cx = w - 1 - cx
        self._target_center = (cx, cy)
        outline = irregular_blob(rng, cfg.target_radius_px, cfg.target_irregularity) + np.array(
            [cx + pad, cy + pad]
        )
        if cfg.target_kind != "none":
            fill_polygon(base_labels, outline, TARGET)
            lesion = cv2.GaussianBlur((base_labels == TARGET).astype(np.float32), (0, 0), 1.2)
            if cfg.target_kind == "iso":
                # Iso-echoic lesions are seen by their hypoechoic halo. The first phantom's halo (a blurred
                # difference, about -3 dB over a pixel) sat inside the speckle like the old hyperechoic
                # contrast did: nobody, model or reader, could see those lesions. Now a near-anechoic rim
                # ``halo_px`` wide (4-7 px: 0.8-1.4 mm at 0.2 mm) at -10 to -15 dB, softened like the border; after
                # the point-spread function it reads about one speckle standard deviation below its
                # surroundings, which is what a reader sees as a halo.
                k = max(1, round(cfg.halo_px))
                ring = cv2.dilate(
                    (base_labels == TARGET).astype(np.uint8),
                    cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)),
                )
                rim = cv2.GaussianBlur(ring.astype(np.float32), (0, 0), 1.2) - lesion
                echo *= 1.0 + (cfg.halo_factor - 1.0) * np.clip(rim, 0.0, 1.0)
            echo *= 1.0 + (cfg.target_contrast - 1.0) * lesion

        # Bone-like bright curved surface with a strong acoustic shadow below it (along the beam = rows).
        # It lies below the lesion (nobody plans a path through bone, and a lesion in its shadow is unseen);
        # when there is no room below the lesion there is no bone.
        bone_depth = 0.0
        if cfg.bone:
            x0, x1 = sorted(rng.uniform(-0.2, 1.2, size=2) * w)
            x1 = max(x1, x0 + 0.3 * w)
            curv = rng.uniform(-0.004, 0.004)
            bend = curv * (xx - (x0 + x1) / 2) ** 2
            inside = (xx >= x0) & (xx <= x1)
            floor = cy + 1.3 * cfg.target_radius_px + 12.0 if cfg.target_kind != "none" else 0.0
            lowest = float(bend[inside].min()) if inside.any() else 0.0
            bone_depth = max(rng.uniform(0.7, 0.9) * h, floor - lowest)
        if cfg.bone and bone_depth <= 0.95 * h:
            surface = bone_depth + bend
            line = np.exp(-0.5 * ((yy - surface) / 1.3) ** 2) * inside
            shadow = np.clip((yy - surface - 1.5) / 4.0, 0.0, 1.0) * inside
            echo = (echo * (1.0 - 0.95 * shadow) + 150.0 * line).astype(np.float32)
        # Needle-like distractors: bright straight lines that do not enter from the border.
        for _ in range(cfg.n_distractors):
            length = rng.uniform(20, 60)
            ang = rng.uniform(0, np.pi)
            c = (rng.uniform(0.2, 0.8) * w + pad, rng.uniform(0.25, 0.9) * h + pad)
            d = (math.cos(ang) * length / 2, math.sin(ang) * length / 2)
            layer = np.zeros_like(echo)
            fill_segment(
                layer, (c[0] - d[0], c[1] - d[1]), (c[0] + d[0], c[1] + d[1]), rng.uniform(1.5, 3), 1.0
            )
            echo += float(rng.uniform(15.0, 50.0)) * cv2.GaussianBlur(layer, (0, 0), 0.7)
        if cfg.n_curved_walls > 0:
            echo = self._curved_walls(echo, xx, yy, base_labels == TARGET)

        # Speckle: complex Gaussian scatterers weighted by sqrt(echogenicity), convolved with the PSF.
        tissue_echo = float(np.mean(echo))
        bath = np.float32(10.0 ** (-cfg.water_bath_db / 10.0))  # 1 without a water bath: nothing changes
        echo *= bath
        scat = np.sqrt(np.maximum(echo, 1e-4 * bath))
        re = rng.standard_normal((hp, wp)).astype(np.float32) * scat
        im = rng.standard_normal((hp, wp)).astype(np.float32) * scat
        sx, sy = cfg.psf_lateral_px, cfg.psf_axial_px
        re = np.asarray(cv2.GaussianBlur(re, (0, 0), sigmaX=sx, sigmaY=sy), dtype=np.float32)
        im = np.asarray(cv2.GaussianBlur(im, (0, 0), sigmaX=sx, sigmaY=sy), dtype=np.float32)
        # Mean intensity follows echogenicity. The scale comes from the speckle alone: a bright reflector
        # must not dim the tissue around it (it did, by several dB, while the reflectors were in the sum).
        env = np.sqrt(re * re + im * im)
        scale = float(np.sqrt(np.mean(env * env) / np.mean(echo)))
        if cfg.n_point_reflectors > 0 or cfg.n_line_reflectors > 0:
            coherent = np.zeros((hp, wp), dtype=np.float32)
            if cfg.n_point_reflectors > 0:
                coherent += self._point_reflectors((hp, wp), tissue_echo, pad)
            if cfg.n_line_reflectors > 0:
                coherent += self._line_reflectors((hp, wp), tissue_echo, pad)
            re += np.asarray(cv2.GaussianBlur(coherent, (0, 0), sigmaX=sx, sigmaY=sy), dtype=np.float32)
            env = np.sqrt(re * re + im * im)
        env /= scale
        db = 20.0 * np.log10(env + 1e-3)
        self._unit = 255.0 / cfg.dynamic_range_db  # display units per dB
        floor_db = -0.45 * cfg.dynamic_range_db - cfg.gain_db
        self._bg: npt.NDArray[np.float32] = ((db - floor_db) * self._unit).astype(np.float32)
        self._base_labels = base_labels
        self._target_area = float(np.count_nonzero(base_labels == TARGET))

        # Depth profile: attenuation minus an imperfect time-gain compensation (display units per row).
        rows = np.arange(h, dtype=np.float32)
        knots = rng.uniform(-cfg.tgc_ripple_db, cfg.tgc_ripple_db, size=6)
        ripple = np.interp(rows, np.linspace(0, h - 1, 6), knots)
        att = cfg.attenuation_db_per_px * rows
        profile_db = -att + att * (1.0 - cfg.tgc_mismatch) + ripple
        self._row_profile = (profile_db * self._unit).astype(np.float32)[:, None]

        self._noise = [
            (rng.standard_normal((h, w)) * cfg.noise_db * self._unit).astype(np.float32)
            for _ in range(_NOISE_BANK)
        ]

        # Curvilinear scan conversion: Cartesian pixel -> (beam row = depth, beam col = angle).
        self._map_x: npt.NDArray[np.float32] | None = None
        self._map_y: npt.NDArray[np.float32] | None = None
        self._outside: npt.NDArray[np.bool_] | None = None
        if cfg.geometry == "curvilinear":
            r0 = cfg.apex_offset_frac * h
            theta_max = math.radians(cfg.sector_half_angle_deg)
            self._apex = ((w - 1) / 2.0, -r0)
            gx = np.arange(w, dtype=np.float32)[None, :] - self._apex[0]
            gy = np.arange(h, dtype=np.float32)[:, None] - self._apex[1]
            r = np.sqrt(gx * gx + gy * gy)
            theta = np.arctan2(gx, gy)
            self._map_y = ((r - r0) * (h - 1) / (h - 1)).astype(np.float32)
            self._map_x = ((theta + theta_max) / (2 * theta_max) * (w - 1)).astype(np.float32)
            self._outside = (r < r0) | (r > r0 + h - 1) | (np.abs(theta) > theta_max)
        self._build_needle_path()

    def _point_reflectors(
        self, shape: tuple[int, int], tissue_echo: float, pad: int
    ) -> npt.NDArray[np.float32]:
        """Scatterer field of the point reflectors, before the point-spread function.

        Each is a short coherent run of scatterers (0-2 px either side laterally, 0-1 px axially), so after
        the PSF it is a bright blob wider than it is tall, like a wire seen across the beam, with a decaying
        ring-down below. Peak echo 12-35 dB above the tissue's speckle (``tissue_echo``: the tissue's mean
        echogenicity before any water bath). Their own generator: the speckle of a sequence does not change
        when reflectors are switched on.
        """
        cfg = self.config
        w, h = self.width, self.height
        field = np.zeros(shape, dtype=np.float32)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x9017E])
        n = cfg.n_point_reflectors
        if cfg.point_layout == "rows":
            n_rows = max(1, min(3, n // 2))
            per_row = math.ceil(n / n_rows)
            y0, dy = rng.uniform(0.2, 0.45) * h, rng.uniform(0.1, 0.2) * h
            x0, dx = rng.uniform(0.15, 0.35) * w, rng.uniform(0.12, 0.25) * w
            pts = [
                (x0 + j * dx + rng.normal(0, 2.0), y0 + i * dy + rng.normal(0, 2.0))
                for i in range(n_rows)
                for j in range(per_row)
            ][:n]
        else:
            pts = [(rng.uniform(0.1, 0.9) * w, rng.uniform(0.15, 0.9) * h) for _ in range(n)]
        # amplitude / (2 pi sx sy) after the PSF, against a blurred speckle rms of
        # sqrt(tissue_echo) / (2 sqrt(pi sx sy)).
        unit = math.sqrt(math.pi * cfg.psf_lateral_px * cfg.psf_axial_px * tissue_echo)
        rows, cols = shape
        for x, y in pts:
            xi, yi = round(x) + pad, round(y) + pad
            amp = unit * 10.0 ** (rng.uniform(12.0, 35.0) / 20.0)
            half_w, half_h = int(rng.integers(0, 3)), int(rng.uniform() < 0.3)
            spacing = rng.uniform(2.5, 5.0)
            n_ring = int(rng.integers(0, 3))
            ring_db = rng.uniform(10.0, 20.0, size=n_ring)
            per = amp / math.sqrt((2 * half_w + 1) * (half_h + 1))  # the run's peak stays near ``amp``
            for k in range(n_ring + 1):  # k = 0: the reflector; then ring-down copies, 10-20 dB weaker each
                a = per * (10.0 ** (-float(ring_db[:k].sum()) / 20.0))
                yk = yi + round(k * spacing)
                r0, r1 = max(0, yk), min(rows, yk + half_h + 1)
                c0, c1 = max(0, xi - half_w), min(cols, xi + half_w + 1)
                if r0 < r1 and c0 < c1:
                    field[r0:r1, c0:c1] += np.float32(a)
        return field

    def _line_reflectors(
        self, shape: tuple[int, int], tissue_echo: float, pad: int
    ) -> npt.NDArray[np.float32]:
        """Scatterer field of the straight line reflectors, before the point-spread function.

        Each line is 1-2.5 px wide with a textured amplitude (log-normal, 0.35) along it, peaking 10-28 dB
        above the tissue's speckle after the PSF, and 1-4 reverberation copies 3-6 px below, each 6-12 dB
        weaker. Both ends stay at least 10 px inside the image. Their own generator.
        """
        cfg = self.config
        w, h = self.width, self.height
        field = np.zeros(shape, dtype=np.float32)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x11E5])
        # A coherent line of per-pixel amplitude ``a`` peaks at a / (sqrt(2 pi) sigma_along) after the PSF.
        unit = math.sqrt(math.pi * cfg.psf_lateral_px * cfg.psf_axial_px * tissue_echo)
        unit /= math.sqrt(2.0 * math.pi) * cfg.psf_lateral_px
        margin = 10.0
        for _ in range(cfg.n_line_reflectors):
            length = min(rng.uniform(40.0, 140.0), w - 2 * margin - 1)
            ang = math.radians(rng.uniform(-25.0, 25.0))
            dx, dy = math.cos(ang) * length / 2, math.sin(ang) * length / 2
            cx = rng.uniform(margin + abs(dx), w - 1 - margin - abs(dx))
            cy = rng.uniform(max(margin + abs(dy), 0.1 * h), h - 1 - margin - abs(dy))
            width = rng.uniform(1.0, 2.5)
            amp = unit * 10.0 ** (rng.uniform(10.0, 28.0) / 20.0) / width  # the width adds up coherently
            spacing = rng.uniform(3.0, 6.0)
            drop_db = 0.0
            for k in range(int(rng.integers(1, 5)) + 1):  # k = 0: the reflector, then its reverberations
                layer = np.zeros(shape, dtype=np.float32)
                off = k * spacing + pad
                fill_segment(
                    layer, (cx - dx + pad, cy - dy + off), (cx + dx + pad, cy + dy + off), width, 1.0
                )
                texture = rng.lognormal(0.0, 0.35, size=shape).astype(np.float32)
                field += np.float32(amp * 10.0 ** (-drop_db / 20.0)) * layer * texture
                drop_db += rng.uniform(6.0, 12.0)
        return field

    def _curved_walls(
        self,
        echo: npt.NDArray[np.float32],
        xx: npt.NDArray[np.float32],
        yy: npt.NDArray[np.float32],
        lesion: npt.NDArray[np.bool_],
    ) -> npt.NDArray[np.float32]:
        """``echo`` with ``n_curved_walls`` curved specular walls (in the beam frame: rows = depth).

        Each is an ellipse 20-70 % of the width across, tilted up to 25 degrees. 60 % are fluid cavities:
        the whole wall, 0.01-0.12 echogenicity inside (anechoic fluid, darker than most hypoechoic lesions,
        and with a smooth border where a lesion's is irregular), and posterior enhancement fading over
        15-60 px below. 40 % are open bowls: the lower 100-220 degrees of the wall, tissue on both sides.
        The wall's brightness goes as 0.25 + 0.75 cos^2 of the angle between its normal and the beam,
        peaking 8-150x (9-22 dB) above the tissue, as bright as a needle at the top of that range; there is
        no shadow. Walls avoid the lesion (its label must stay true); one that cannot be placed in 12 tries
        is left out. Their own generator: the speckle does not change when walls are switched on.
        """
        cfg = self.config
        w, h = self.width, self.height
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xB0771E])
        keep_out = cv2.dilate(
            lesion.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13))
        ).astype(bool)
        for _ in range(cfg.n_curved_walls):
            cavity = rng.uniform() < 0.6
            for _try in range(12):
                a = rng.uniform(0.1, 0.35) * w  # semi-axes in pixels
                b = a * rng.uniform(0.35, 0.9)
                cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.75) * h
                phi = math.radians(rng.uniform(-25.0, 25.0))
                c, s = math.cos(phi), math.sin(phi)
                u = (xx - cx) * c + (yy - cy) * s  # ellipse frame
                v = -(xx - cx) * s + (yy - cy) * c
                rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
                gu, gv = u / (a * a * rho), v / (b * b * rho)  # gradient of rho, ellipse frame
                gnorm = np.sqrt(gu * gu + gv * gv) + 1e-6
                dist = (rho - 1.0) / gnorm  # signed distance to the wall, pixels (first order)
                wall = np.exp(-0.5 * (dist / rng.uniform(0.8, 1.5)) ** 2)
                if not cavity:
                    # The lower arc only: parametric angle within +-span/2 of straight down.
                    half = math.radians(rng.uniform(100.0, 220.0)) / 2
                    ang = np.arctan2(v / b, u / a) - math.pi / 2
                    off = np.abs(np.angle(np.exp(1j * ang)))
                    wall *= np.clip((half - off) / 0.15, 0.0, 1.0).astype(np.float32)
                inside = rho < 1.0
                if not ((wall > 0.2) & keep_out).any() and not (cavity and (inside & keep_out).any()):
                    break
            else:
                continue
            ny = (gu * s + gv * c) / gnorm  # the normal's component along the beam (image rows)
            wall *= 0.25 + 0.75 * ny * ny
            if cavity:
                fluid = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 1.0)
                echo = echo * (1.0 + (rng.uniform(0.01, 0.12) - 1.0) * fluid)
                # Posterior enhancement: below the cavity, along the beam, fading with depth.
                rows = np.arange(inside.shape[0], dtype=np.float32)[:, None]
                bottom = np.where(
                    inside.any(axis=0), inside.shape[0] - 1 - np.argmax(inside[::-1], axis=0), -1
                )
                depth = rows - bottom[None, :].astype(np.float32)
                below = (depth > 0) & (bottom[None, :] >= 0)
                fade = np.exp(-np.maximum(depth, 0.0) / rng.uniform(15.0, 60.0))
                echo = echo * (1.0 + rng.uniform(0.3, 1.0) * below * fade)
            peak = math.exp(rng.uniform(math.log(8.0), math.log(150.0)))
            echo = (echo + peak * wall).astype(np.float32)
        return echo

    def _visible(self, p: PointF) -> bool:
        x, y = p
        if not (0.0 <= x <= self.width - 1 and 0.0 <= y <= self.height - 1):
            return False
        if self._outside is None:
            return True
        return not bool(self._outside[round(y), round(x)])

    def _build_needle_path(self) -> None:
        """Straight needle line aimed at the lesion (or beside it), entering where it meets the field."""
        cfg = self.config
        a = math.radians(cfg.needle_angle_deg)
        d = (math.cos(a), math.sin(a)) if cfg.needle_side == "left" else (-math.cos(a), math.sin(a))
        self._dir = d
        normal = (-d[1], d[0])
        aim = (
            self._target_center[0] + cfg.aim_offset_px * normal[0],
            self._target_center[1] + cfg.aim_offset_px * normal[1],
        )
        far = 4.0 * (self.width + self.height)
        hub = (aim[0] - d[0] * far, aim[1] - d[1] * far)
        # walk from the hub to the first visible point (entry), then to the last visible point
        step = 0.5
        ts = np.arange(0.0, 2 * far, step)
        px = hub[0] + ts * d[0]
        py = hub[1] + ts * d[1]
        inside = (px >= 0) & (px <= self.width - 1) & (py >= 0) & (py <= self.height - 1)
        if self._outside is not None:
            ix = np.clip(np.round(px).astype(np.int64), 0, self.width - 1)
            iy = np.clip(np.round(py).astype(np.int64), 0, self.height - 1)
            inside &= ~self._outside[iy, ix]
        idx = np.flatnonzero(inside)
        self._entry: PointF | None = None
        self._max_depth = 0.0
        if idx.size == 0:
            return
        t_entry, t_exit = float(ts[idx[0]]), float(ts[idx[-1]])
        self._entry = (hub[0] + t_entry * d[0], hub[1] + t_entry * d[1])
        t_aim = far + cfg.overshoot_frac * cfg.target_radius_px
        margin = 6.0
        self._max_depth = max(0.0, min(t_aim, t_exit - margin) - t_entry)

    # ------------------------------------------------------------------ per frame
    def _offsets(self, t: float) -> tuple[int, int]:
        cfg = self.config
        oy = cfg.breathing_amp_px * math.sin(2 * math.pi * t / cfg.breathing_period_s)
        ox = cfg.probe_amp_px * math.sin(2 * math.pi * t / cfg.probe_period_s + 1.3)
        return round(ox), round(oy)

    def frame(self, index: int) -> PhantomFrame:
        """Frame ``index`` (>= 0) of the sequence: image and ground truth."""
        if index < 0:
            raise IndexError(f"frame index must be >= 0, got {index}")
        cfg = self.config
        w, h, pad = self.width, self.height, self._pad
        t = index / self.fps
        ox, oy = self._offsets(t)
        y0, x0 = pad + oy, pad + ox
        # Tissue moves under the probe: content at tissue (x, y) appears at image (x - ox, y - oy).
        bg = self._bg[y0 : y0 + h, x0 : x0 + w]
        base_lab = self._base_labels[y0 : y0 + h, x0 : x0 + w]
        if self._map_x is not None and self._map_y is not None and self._outside is not None:
            beam = bg + self._row_profile
            buf = np.asarray(
                cv2.remap(beam, self._map_x, self._map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT),
                dtype=np.float32,
            )
            labels = np.asarray(
                cv2.remap(base_lab, self._map_x, self._map_y, cv2.INTER_NEAREST, borderValue=0),
                dtype=np.uint8,
            )
        else:
            buf = bg + self._row_profile
            labels = base_lab.copy()
        target_mask = labels == TARGET
        centroid: PointF | None = None
        if self._target_area > 0:
            m = cv2.moments(target_mask.view(np.uint8), binaryImage=True)
            if m["m00"] > 0:
                centroid = (m["m10"] / m["m00"], m["m01"] / m["m00"])

        frac = cfg.insertion_fraction(t)
        depth = frac * self._max_depth
        tip: PointF | None = None
        centerline: npt.NDArray[np.float32] | None = None
        entry = self._entry
        if entry is not None and depth >= 3.0:
            d = self._dir
            tip = (entry[0] + depth * d[0], entry[1] + depth * d[1])
            segments = self._visible_segments(t, entry, tip)
            self._draw_needle(buf, labels, entry, tip, segments)
            centerline = np.array([entry, tip], dtype=np.float32)

        buf += self._noise[(index * 2654435761 + self.seed) % _NOISE_BANK]
        np.clip(buf, 0.0, 255.0, out=buf)
        image = buf.astype(np.uint8)
        if self._outside is not None:
            image[self._outside] = 0
            labels[self._outside] = 0
        present = tip is not None and bool(np.any(labels == INSTRUMENT))
        if not present:
            tip, centerline = None, None
        return PhantomFrame(
            index=index,
            time_s=t,
            image=image,
            labels=labels,
            instrument_present=present,
            tip_px=tip,
            entry_px=entry if present else None,
            axis_angle_deg=axis_angle_deg(self._dir) if present else None,
            tip_direction_deg=axis_angle_deg(self._dir) if present else None,  # a straight needle
            target_centroid_px=centroid,
            target_radius_px=math.sqrt(self._target_area / math.pi),
            spacing_mm=self.spacing_mm,
            modality="us",
            centerline_px=centerline,
        )

    def _visible_segments(self, t: float, entry: PointF, tip: PointF) -> list[tuple[PointF, PointF]]:
        """In-plane parts of the shaft; a middle stretch is missing while the needle bends out of plane."""
        cfg = self.config
        if cfg.out_of_plane_frac <= 0.0:
            return [(entry, tip)]
        s = math.sin(2 * math.pi * t / cfg.oop_period_s + 0.7 * self.seed)
        if s <= 1.0 - 2.0 * cfg.out_of_plane_frac:
            return [(entry, tip)]
        g0, g1 = 0.3, 0.3 + 0.35 * min(1.0, (s - (1.0 - 2.0 * cfg.out_of_plane_frac)) / 0.5 + 0.3)
        g1 = min(g1, 0.8)

        def lerp(u: float) -> PointF:
            return (entry[0] + u * (tip[0] - entry[0]), entry[1] + u * (tip[1] - entry[1]))

        return [(entry, lerp(g0)), (lerp(g1), tip)]

    def _draw_needle(
        self,
        buf: npt.NDArray[np.float32],
        labels: npt.NDArray[np.uint8],
        entry: PointF,
        tip: PointF,
        segments: list[tuple[PointF, PointF]],
    ) -> None:
        cfg = self.config
        h = self.height
        # Acoustic shadow along the beam (rows for linear, rays from the apex for curvilinear).
        layer = np.zeros_like(buf)
        if self._outside is None:
            quad = [entry, tip, (tip[0], h + 8.0), (entry[0], h + 8.0)]
        else:
            ax, ay = self._apex
            k = 4.0 * h
            quad = [entry, tip]
            for p in (tip, entry):
                vx, vy = p[0] - ax, p[1] - ay
                n = math.hypot(vx, vy)
                quad.append((p[0] + vx / n * k, p[1] + vy / n * k))
        poly = np.array([fixed(p) for p in quad], dtype=np.int32)
        cv2.fillPoly(layer, [poly], -cfg.shadow_db * self._unit, lineType=cv2.LINE_8, shift=DRAW_SHIFT)
        # Specular shaft (brightness falls with insertion angle), a bright bevel at the tip, reverberations.
        # In a water bath the needle echoes as it would in tissue: its level is lifted by the bath's drop.
        vis = 0.3 + 0.7 * math.cos(math.radians(cfg.needle_angle_deg)) ** 2
        peak = cfg.needle_brightness_db * vis * self._unit
        bath = cfg.water_bath_db * self._unit
        for a, b in segments:
            fill_segment(layer, a, b, cfg.needle_width_px, peak + bath)
            for r in range(1, cfg.reverb_count + 1):
                off = r * cfg.reverb_spacing_px
                fill_segment(
                    layer,
                    (a[0], a[1] + off),
                    (b[0], b[1] + off),
                    max(1.0, cfg.needle_width_px - 1.0),
                    peak * 0.55**r + bath,
                )
        cv2.circle(
            layer, fixed(tip), round(cfg.needle_width_px * 8), peak * 1.2 + bath, -1, cv2.LINE_8, DRAW_SHIFT
        )
        buf += np.asarray(
            cv2.GaussianBlur(layer, (0, 0), sigmaX=cfg.psf_lateral_px * 0.6, sigmaY=cfg.psf_axial_px),
            dtype=np.float32,
        )
        for a, b in segments:
            fill_segment(labels, a, b, cfg.needle_width_px, INSTRUMENT)

    def __iter__(self) -> Iterator[PhantomFrame]:
        i = 0
        while True:
            yield self.frame(i)
            i += 1

    def frames(self, count: int, start: int = 0) -> Iterator[PhantomFrame]:
        """``count`` consecutive frames from ``start``."""
        for i in range(start, start + count):
            yield self.frame(i)
