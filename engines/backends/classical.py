"""Classical (no learning) baseline: the traditional image-processing methods the AI is meant to beat.

Instrument: a Hessian ridge ("line-ness") filter on a smoothed image finds thin bright structures (the
image is inverted first when the instrument is dark, as in fluoroscopy); the strongest ridge pixels are
grouped into straight segments with the probabilistic Hough transform; the longest one seeds a robust
re-fit (Huber ``cv2.fitLine``) over nearby ridge pixels, whose contiguous extent along the axis gives the
segment that is drawn, thick, into the label map. The normalised ridge response is returned as the
instrument score map.

Target: a dark blob. The image is reduced to half size, smoothed, divided by a wide local mean (so depth
attenuation and gain bands cancel), thresholded, and the darkest compact, roughly round component is kept
and its contour filled. Only hypo-echoic (US) or radio-opaque-dark (fluoro) targets are found; hyper- and
iso-echoic lesions are beyond this baseline on purpose.

Everything runs in cv2 on a working copy of at most ``work_size`` pixels on the long side (256 by default)
and is drawn back at the input geometry. About 1-3 ms per 256x256 frame on one CPU core.
"""

from __future__ import annotations

import logging
import math
from types import MappingProxyType
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from engines.base import (
    INSTRUMENT,
    TARGET,
    EngineError,
    EngineInfo,
    SegmentationOutput,
)
from engines.registry import BackendSpec, register

logger = logging.getLogger(__name__)

Polarity = Literal["auto", "bright", "dark"]
_MODALITY_POLARITY: dict[str, Polarity] = {
    "us": "bright",
    "ultrasound": "bright",
    "fluoro": "dark",
    "xa": "dark",
}


def to_gray_u8(image: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Any 2-D (or HxWxC) uint8/uint16/float image -> 2-D uint8 (robust min/max stretch when not uint8)."""
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[2] in (1, 2) else a[..., :3].mean(axis=2)
    if a.ndim != 2:
        raise EngineError(f"classical engine needs a 2-D image, got shape {np.shape(image)}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    f = a.astype(np.float32, copy=False)
    sample = f[:: max(1, f.shape[0] // 64), :: max(1, f.shape[1] // 64)]
    lo, hi = np.percentile(sample, (0.5, 99.8)) if sample.size else (0.0, 1.0)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(np.nanmin(f)), float(np.nanmax(f))
        if not hi > lo:
            return np.zeros(f.shape, dtype=np.uint8)
    out = cv2.convertScaleAbs(f, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))
    return np.asarray(out, dtype=np.uint8)


class ClassicalEngine:
    """Ridge filter + Hough/robust line fit for the instrument, dark-blob detection for the target.

    Args:
        polarity: ``"bright"`` instrument on darker tissue (ultrasound), ``"dark"`` (fluoroscopy), or
            ``"auto"`` (decided per frame from the speckle level: ultrasound is speckled, X-ray is smooth).
        modality: ``"us"`` or ``"fluoro"``; sets ``polarity`` when that is ``"auto"``.
        work_size: long side of the working copy (larger inputs are reduced with area averaging).
        min_length_px: shortest segment (input pixels at 256 working size) accepted as an instrument.
        line_width_px: width of the drawn instrument, in working pixels.
        detect_target: also look for the dark target blob.
    """

    name = "classical"

    def __init__(
        self,
        *,
        polarity: Polarity = "auto",
        modality: str | None = None,
        work_size: int = 256,
        min_length_px: float = 14.0,
        line_width_px: float = 3.0,
        detect_target: bool = True,
        **_ignored: Any,
    ) -> None:
        if modality is not None and polarity == "auto":
            polarity = _MODALITY_POLARITY.get(modality.lower(), "auto")
        if polarity not in ("auto", "bright", "dark"):
            raise EngineError(f"polarity must be auto, bright or dark, got {polarity!r}")
        self.polarity: Polarity = polarity
        self.work_size = int(work_size)
        self.min_length_px = float(min_length_px)
        self.line_width_px = float(line_width_px)
        self.detect_target = detect_target
        self._loaded = False
        if _ignored:
            logger.debug("classical engine ignores options: %s", ", ".join(sorted(_ignored)))

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        self._loaded = True

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        self.infer(rng.integers(0, 255, size=(128, 128), dtype=np.uint8))

    def reset(self) -> None:
        """Nothing to forget: every frame is segmented on its own."""

    def describe(self) -> EngineInfo:
        return EngineInfo(
            backend="classical",
            device="cpu",
            precision="n/a",
            input_size=None,
            model=f"hessian-ridge+hough / dark-blob (polarity {self.polarity})",
        )

    def close(self) -> None:
        self._loaded = False

    # ------------------------------------------------------------------ inference
    def infer(self, image: npt.NDArray[np.generic]) -> SegmentationOutput:
        gray = to_gray_u8(image)
        h, w = gray.shape
        scale = min(1.0, self.work_size / max(h, w))
        work = gray
        if scale < 1.0:
            size = (max(8, round(w * scale)), max(8, round(h * scale)))
            work = np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
        polarity = self.polarity if self.polarity != "auto" else self._detect_polarity(work)
        valid = _field_of_view(work, dark_margin=polarity == "dark")
        instrument_src = work if polarity == "bright" else np.asarray(cv2.bitwise_not(work), dtype=np.uint8)

        labels = np.zeros((h, w), dtype=np.uint8)
        ridge, smooth = self._ridge(instrument_src)
        segment, present = self._find_segment(ridge, smooth, valid)
        if self.detect_target:
            contour = self._find_dark_blob(work, valid)
            if contour is not None:
                cv2.fillPoly(labels, [np.round(contour / scale).astype(np.int32)], TARGET)
        if segment is not None:
            (x0, y0), (x1, y1) = segment
            thick = max(1, round(self.line_width_px / scale))
            cv2.line(
                labels,
                (round(x0 / scale), round(y0 / scale)),
                (round(x1 / scale), round(y1 / scale)),
                INSTRUMENT,
                thick,
                cv2.LINE_8,
            )
        prob = ridge if scale == 1.0 else np.asarray(cv2.resize(ridge, (w, h)), dtype=np.float32)
        return SegmentationOutput(
            labels=labels,
            instrument_prob=prob,
            scores=MappingProxyType(
                {"instrument_present": present, "dark_polarity": float(polarity == "dark")}
            ),
        )

    @staticmethod
    def _detect_polarity(work: npt.NDArray[np.uint8]) -> Polarity:
        """Ultrasound (bright instrument) is speckled: strong fine texture that is correlated between
        neighbouring pixels (the PSF). X-ray (dark instrument) is smooth, and its quantum noise is white.
        Score = relative high-pass amplitude x lag-1 correlation, on the central half of the image."""
        h, w = work.shape
        c = work[h // 4 : h - h // 4, w // 4 : w - w // 4]
        f = c.astype(np.float32)
        hp = f - np.asarray(cv2.blur(f, (7, 7)), dtype=np.float32)
        inside = c > 0
        m = inside[:, :-1] & inside[:, 1:]
        if int(m.sum()) < 64:
            return "bright"
        a, b = hp[:, :-1][m], hp[:, 1:][m]
        sa, sb = float(a.std()), float(b.std())
        corr = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb)) if sa > 0 and sb > 0 else 0.0
        texture = sa / max(1.0, float(f[inside].mean())) * max(corr, 0.0)
        return "bright" if texture > 0.06 else "dark"

    @staticmethod
    def _ridge(src: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Bright-line strength in [0, 1]: ``-lambda_min - |lambda_max|`` of the Hessian at sigma 1.5
        (Frangi-like, so blobs - both eigenvalues negative - score low and lines high)."""
        f = np.asarray(cv2.GaussianBlur(src.astype(np.float32), (0, 0), 1.5), dtype=np.float32)
        dxx = cv2.Sobel(f, cv2.CV_32F, 2, 0, ksize=3)
        dyy = cv2.Sobel(f, cv2.CV_32F, 0, 2, ksize=3)
        dxy = cv2.Sobel(f, cv2.CV_32F, 1, 1, ksize=3)
        # eigenvalues (tr/2 -+ disc); -lam_min - |lam_max| simplifies to min(-trace, 2*disc), floored at 0
        disc = np.asarray(cv2.magnitude(cv2.addWeighted(dxx, 0.5, dyy, -0.5, 0.0), dxy), dtype=np.float32)
        neg_trace = np.asarray(cv2.addWeighted(dxx, -1.0, dyy, -1.0, 0.0), dtype=np.float32)
        disc *= 2.0
        r = np.minimum(neg_trace, disc, out=neg_trace)
        np.maximum(r, 0.0, out=r)
        # normalise by the frame's own response statistics so the score map is comparable between frames
        mean, std = cv2.meanStdDev(r)
        ref = max(float(mean[0, 0]) + 8.0 * float(std[0, 0]), 1e-3)
        r *= 1.0 / ref
        np.minimum(r, 1.0, out=r)
        return r, f

    def _find_segment(
        self, ridge: npt.NDArray[np.float32], smooth: npt.NDArray[np.float32], valid: npt.NDArray[np.bool_]
    ) -> tuple[tuple[tuple[float, float], tuple[float, float]] | None, float]:
        h, w = ridge.shape
        strong = (ridge > 0.45).astype(np.uint8)
        # a fan's straight borders are edges, not needles
        if not valid.all():
            strong &= np.asarray(
                cv2.erode(valid.astype(np.uint8), np.ones((11, 11), np.uint8)), dtype=np.uint8
            )
        min_len = self.min_length_px * max(h, w) / 256.0
        lines = cv2.HoughLinesP(strong, 1, math.pi / 180, threshold=15, minLineLength=min_len, maxLineGap=5)
        # OpenCV 4 answers "no line" with None and shapes hits (N, 1, 4); OpenCV 5 answers with an empty
        # (0, 4) array and shapes hits (N, 4). Accept both.
        if lines is None or np.size(lines) == 0:
            return None, 0.0
        segs = np.asarray(lines).reshape(-1, 4).astype(np.float32)
        lengths = np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])
        # Among the longest candidates keep the one that is a line, not an edge: darker (after polarity)
        # than its line on BOTH sides. Collimator blades, bone and organ borders are one-sided steps.
        order = np.argsort(-lengths)[:8]
        scores = [lengths[k] * _two_sided_contrast(smooth, segs[k]) for k in order]
        k_best = int(order[int(np.argmax(scores))])
        if scores[int(np.argmax(scores))] <= 0.0:
            return None, 0.0
        best = segs[k_best]
        # robust re-fit over ridge pixels near the Hough line
        ys, xs = np.nonzero(strong)
        pts = np.stack([xs, ys], axis=1).astype(np.float32)
        p0 = best[:2]
        d = best[2:] - best[:2]
        d /= max(float(np.hypot(d[0], d[1])), 1e-6)
        nrm = np.array([-d[1], d[0]], dtype=np.float32)
        near = np.abs((pts - p0) @ nrm) <= 2.5
        pts = pts[near]
        if len(pts) < 5:
            return None, 0.0
        vx, vy, cx, cy = (float(v) for v in cv2.fitLine(pts, cv2.DIST_HUBER, 0, 0.01, 0.01).ravel())
        d = np.array([vx, vy], dtype=np.float32)
        c = np.array([cx, cy], dtype=np.float32)
        nrm = np.array([-vy, vx], dtype=np.float32)
        # extent: walk the fitted line and compare the smoothed intensity on it (max over +-1 px across)
        # with the tissue 7 px to either side; the run (gaps up to 6 px bridged) around the Hough seed
        # where that contrast stays above 40 % of the seed's own contrast is the visible shaft
        t_lo, t_hi = _line_range(c, d, w, h)
        ts = np.arange(t_lo, t_hi + 0.5, 1.0, dtype=np.float32)
        if ts.size < 2:
            return None, 0.0

        def sample(off: float) -> npt.NDArray[np.float32]:
            xs_ = np.clip(np.rint(c[0] + ts * d[0] + off * nrm[0]), 0, w - 1).astype(np.intp)
            ys_ = np.clip(np.rint(c[1] + ts * d[1] + off * nrm[1]), 0, h - 1).astype(np.intp)
            return np.asarray(smooth[ys_, xs_], dtype=np.float32)

        on_line = np.maximum(np.maximum(sample(-1.0), sample(0.0)), sample(1.0))
        contrast = on_line - 0.5 * (sample(-7.0) + sample(7.0))
        contrast = np.convolve(contrast, np.full(5, 0.2, dtype=np.float32), mode="same")
        seed_lo = float((best[:2] - c) @ d)
        seed_hi = float((best[2:] - c) @ d)
        seed_sel = (ts >= min(seed_lo, seed_hi)) & (ts <= max(seed_lo, seed_hi))
        seed_contrast = float(np.median(contrast[seed_sel])) if seed_sel.any() else 0.0
        if seed_contrast <= 4.0:
            return None, 0.0
        resp = contrast / seed_contrast
        on = np.flatnonzero(resp > 0.4)
        if on.size == 0:
            return None, 0.0
        seed_t = float(((best[:2] + best[2:]) / 2 - c) @ d)
        breaks = np.flatnonzero(np.diff(on) > 6)
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks, [on.size - 1]])
        k = int(np.clip(np.searchsorted(ts[on[starts]], seed_t, side="right") - 1, 0, len(starts) - 1))
        t0, t1 = float(ts[on[starts[k]]]), float(ts[on[ends[k]]])
        length = t1 - t0
        if length < min_len:
            return None, 0.0
        a = (cx + t0 * vx, cy + t0 * vy)
        b = (cx + t1 * vx, cy + t1 * vy)
        fill = (ends[k] - starts[k] + 1) / max(length + 1.0, 1.0)
        strength = float(np.clip(seed_contrast / 40.0, 0.0, 1.0))  # grey levels above the tissue beside it
        score = float(np.clip(length / (3.0 * min_len), 0.0, 1.0) * fill * strength)
        return (a, b), score

    @staticmethod
    def _find_dark_blob(
        work: npt.NDArray[np.uint8], valid: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.float32] | None:
        """Contour (working pixels) of the darkest compact round region, or None."""
        h, w = work.shape
        small = cv2.resize(work, (max(8, w // 2), max(8, h // 2)), interpolation=cv2.INTER_AREA).astype(
            np.float32
        )
        vmask = cv2.resize(
            valid.astype(np.uint8), (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        vmask = cv2.erode(vmask, np.ones((5, 5), np.uint8))
        smooth = cv2.GaussianBlur(small, (0, 0), 2.0)
        k = max(9, (min(small.shape) // 3) | 1)
        # local mean over valid pixels only (normalised box filter)
        num = cv2.blur(smooth * vmask, (k, k))
        den = cv2.blur(vmask.astype(np.float32), (k, k))
        local = num / np.maximum(den, 1e-3)
        ratio = smooth / np.maximum(local, 1.0)
        # dark relative to the surroundings by more than 3 robust sigmas of this frame's own texture
        # (speckle in ultrasound, quantum noise and anatomy in X-ray), and by at least 3 %
        darkness_map = 1.0 - ratio
        inside_vals = darkness_map[vmask > 0]
        if inside_vals.size < 16:
            return None
        med = float(np.median(inside_vals))
        sigma = 1.4826 * float(np.median(np.abs(inside_vals - med)))
        cand = ((darkness_map > med + max(3.0 * sigma, 0.03)) & (vmask > 0)).astype(np.uint8)
        cand = np.asarray(cv2.morphologyEx(cand, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)), dtype=np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
        best: npt.NDArray[np.float32] | None = None
        best_score = 0.0
        area_min, area_max = 12.0, 0.15 * small.size
        for i in range(1, n):
            area = float(stats[i, cv2.CC_STAT_AREA])
            if not area_min <= area <= area_max:
                continue
            x, y, bw, bh = (int(stats[i, j]) for j in range(4))
            if min(bw, bh) / max(bw, bh) < 0.4 or area / (bw * bh) < 0.45:
                continue  # elongated or ragged: a shadow band, not a lesion
            sub = comp[y : y + bh, x : x + bw] == i
            darkness = 1.0 - float(ratio[y : y + bh, x : x + bw][sub].mean())
            score = darkness * math.sqrt(area)
            if score > best_score:
                cs, _ = cv2.findContours(sub.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                if not cs:
                    continue
                best_score = score
                best = (cs[0].reshape(-1, 2).astype(np.float32) + np.array([x, y], np.float32)) * 2.0 + 0.5
        return best


def _field_of_view(work: npt.NDArray[np.uint8], *, dark_margin: bool = False) -> npt.NDArray[np.bool_]:
    """Pixels inside the imaged field: excludes large exactly-zero areas that touch the border (outside a
    curvilinear fan), or with ``dark_margin`` large dark border-connected areas (X-ray collimator blades,
    which leak a little), not dark structures inside the image."""
    if dark_margin:
        level = 0.6 * float(np.median(work[::4, ::4]))
        zero = np.asarray(cv2.blur(work, (5, 5)) < level, dtype=np.uint8)
    else:
        zero = (work == 0).astype(np.uint8)
    if not zero[0].any() and not zero[-1].any() and not zero[:, 0].any() and not zero[:, -1].any():
        return np.ones(work.shape, dtype=bool)
    zero = np.asarray(cv2.morphologyEx(zero, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)), dtype=np.uint8)
    n, comp = cv2.connectedComponents(zero, connectivity=4)
    if n <= 1:
        return np.ones(work.shape, dtype=bool)
    border = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
    border = border[border > 0]
    return ~np.isin(comp, border)


def _two_sided_contrast(smooth: npt.NDArray[np.float32], seg: npt.NDArray[np.float32]) -> float:
    """Median over a segment of ``line - max(side_a, side_b)`` (each side the darkest of 4, 6, 8 px away) minus half the median side
    difference: > 0 for a bright line between similar sides, <= 0 for a step edge or a shadowing surface."""
    h, w = smooth.shape
    p0, p1 = seg[:2], seg[2:]
    n = max(2, int(np.hypot(*(p1 - p0))))
    d = (p1 - p0) / max(float(np.hypot(*(p1 - p0))), 1e-6)
    nrm = np.array([-d[1], d[0]], dtype=np.float32)
    u = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    pts = p0[None, :] + u * (p1 - p0)[None, :]

    def at(off: float) -> npt.NDArray[np.float32]:
        q = pts + off * nrm
        xs = np.clip(np.rint(q[:, 0]), 0, w - 1).astype(np.intp)
        ys = np.clip(np.rint(q[:, 1]), 0, h - 1).astype(np.intp)
        return np.asarray(smooth[ys, xs], dtype=np.float32)

    line = at(0.0)
    # each side: the darkest of three offsets, so a needle's thin reverberation copies below it do not
    # count as a bright side
    side_a = np.minimum(np.minimum(at(-4.0), at(-6.0)), at(-8.0))
    side_b = np.minimum(np.minimum(at(4.0), at(6.0)), at(8.0))
    # a bone surface is bright too, but with a black acoustic shadow on one side only: penalise asymmetry
    return float(np.median(line - np.maximum(side_a, side_b)) - 0.5 * np.median(np.abs(side_a - side_b)))


def _line_range(
    c: npt.NDArray[np.float32], d: npt.NDArray[np.float32], w: int, h: int
) -> tuple[float, float]:
    """Parameter range ``[t0, t1]`` of the line ``c + t*d`` inside ``[0, w-1] x [0, h-1]``."""
    lo, hi = -math.inf, math.inf
    for ci, di, size in ((float(c[0]), float(d[0]), w), (float(c[1]), float(d[1]), h)):
        if abs(di) < 1e-9:
            continue
        ta, tb = (0.0 - ci) / di, (size - 1.0 - ci) / di
        lo, hi = max(lo, min(ta, tb)), min(hi, max(ta, tb))
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 0.0
    return lo, hi


def _factory(**options: Any) -> ClassicalEngine:
    return ClassicalEngine(**options)


register(
    BackendSpec(
        name="classical",
        priority=0,
        probe=lambda: None,
        factory=_factory,
        description="classical baseline: Hessian ridge + Hough line (instrument), dark blob (target); CPU",
    )
)
