"""Frame pixels -> network input tensor, and network outputs -> frame geometry, shared by every backend.

One :class:`Preprocessor` per engine. It owns preallocated buffers sized for the current frame geometry
(reallocated only when the geometry or dtype of the incoming frames changes), so the hot path of a steady
stream does no per-frame allocation for the input side: luminance, normalisation (``np.multiply(out=)``)
and resize (``cv2.resize(dst=)``) all write into those buffers, and the network input is a view of one
``(1, C, H, W)`` float32 buffer that a backend may supply itself (pinned host memory, an ORT-bound array).

The normalisation follows the model card's ``normalization`` block exactly (see :class:`Normalization`):
raw pixels are normalised at the frame's own resolution *then* resized, the same order the training code
uses (``engines.models.preprocess.to_input``), so the tensor matches what the network was trained on.

Temporal models (``temporal=True``, two channels; card ``input.channel_meaning`` = "current frame",
"current frame minus previous frame"): channel 0 is the plane as above, channel 1 the plane minus the
previous frame's plane (``np.subtract(out=)`` against a preallocated copy of the last plane), as
``engines.models.preprocess.temporal_input`` defines it. The difference is zero on the first frame, after
:meth:`Preprocessor.reset` and whenever the frame geometry or dtype changes; in letterbox padding both planes
hold the pad value, so it is exactly zero there.

Geometry: ``"stretch"`` (the default; what the shipped model is trained with) resizes the whole frame to the
network input; ``"letterbox"`` keeps the aspect ratio and pads with the normalised value of 0. Outputs are
mapped back by cropping the letterbox region and resizing to the frame (nearest for labels, linear for
probabilities). The arrays returned by :meth:`Preprocessor.restore_labels` / :meth:`restore_prob` are
fresh (one allocation per frame each): they cross threads inside results that the UI and the recorder hold
on to, so they must never be overwritten by the next frame.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import cv2
import numpy as np
import numpy.typing as npt

from engines.base import INSTRUMENT

_T = TypeVar("_T", np.uint8, np.float32)
logger = logging.getLogger(__name__)

#: Normalisation rule of ``engines.models`` (kept literally here so this module does not need that one).
PERCENTILE_RULE_ID = "uint8/255;uint16:p0.5-p99.5;float:clip01"
_P_LOW, _P_HIGH = 0.5, 99.5

Geometry = Literal["stretch", "letterbox"]


class PreprocessError(ValueError):
    """A frame or a normalisation block cannot be handled; the message says what and why."""


@dataclass(frozen=True, slots=True)
class Normalization:
    """How raw pixels become network input values.

    ``kind="scale"``: ``value = raw * s + offset`` where ``s`` is ``scale`` for uint8 frames,
    ``uint16_scale`` for wider integers (default ``scale / 257``: the full 16-bit range maps onto the same
    range as 8 bits) and ``float_scale`` for floating-point frames (default 1: floats are taken as already
    scaled). Then ``(value - mean) / std`` and, when ``clip`` is set, clipping to ``clip``.

    ``kind="percentile"`` (:data:`PERCENTILE_RULE_ID`, the rule of ``engines.models``): uint8 ``/255``;
    wider integers are stretched per frame between their 0.5th and 99.5th percentiles and clipped to
    [0, 1]; floats are clipped to [0, 1].
    """

    kind: Literal["scale", "percentile"] = "scale"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    uint16_scale: float | None = None
    float_scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    clip: tuple[float, float] | None = None

    @classmethod
    def from_card(cls, block: Mapping[str, Any]) -> Normalization:
        """Parse a model card's ``normalization`` block; raise :class:`PreprocessError` if unknown."""
        kind = str(block.get("kind", block.get("id", "")))
        if kind in ("percentile", PERCENTILE_RULE_ID) or block.get("id") == PERCENTILE_RULE_ID:
            return cls(kind="percentile")
        if kind == "scale":
            clip = block.get("clip")
            try:
                return cls(
                    kind="scale",
                    scale=float(block.get("scale", 1.0 / 255.0)),
                    offset=float(block.get("offset", 0.0)),
                    uint16_scale=None if block.get("uint16_scale") is None else float(block["uint16_scale"]),
                    float_scale=float(block.get("float_scale", 1.0)),
                    mean=float(block.get("mean", 0.0)),
                    std=float(block.get("std", 1.0)),
                    clip=None if clip is None else (float(clip[0]), float(clip[1])),
                )
            except (TypeError, ValueError, IndexError) as exc:
                raise PreprocessError(f"normalization block {dict(block)!r} is malformed: {exc}") from exc
        raise PreprocessError(
            f"unknown normalization kind {kind!r}; known: 'scale', 'percentile' ({PERCENTILE_RULE_ID})"
        )

    def affine(self, dtype: np.dtype[Any]) -> tuple[float, float]:
        """``(a, b)`` with ``value = raw * a + b`` for ``kind="scale"`` frames of ``dtype``."""
        if dtype == np.uint8:
            s = self.scale
        elif np.issubdtype(dtype, np.integer):
            s = self.uint16_scale if self.uint16_scale is not None else self.scale / 257.0
        else:
            s = self.float_scale
        if self.std == 0:
            raise PreprocessError("normalization std must not be 0")
        return s / self.std, (self.offset - self.mean) / self.std


@dataclass(frozen=True, slots=True)
class FrameGeometry:
    """Where a frame of ``src_hw`` lands inside the network input ``dst_hw``.

    The frame is resized to ``(nh, nw)`` and placed at row ``y0``, column ``x0``; the rest is padding.
    """

    src_hw: tuple[int, int]
    dst_hw: tuple[int, int]
    y0: int
    x0: int
    nh: int
    nw: int

    @classmethod
    def compute(cls, src_hw: tuple[int, int], dst_hw: tuple[int, int], mode: Geometry) -> FrameGeometry:
        h, w = src_hw
        dh, dw = dst_hw
        if h <= 0 or w <= 0:
            raise PreprocessError(f"empty frame {src_hw}")
        if mode == "stretch":
            return cls(src_hw, dst_hw, 0, 0, dh, dw)
        s = min(dh / h, dw / w)
        nh = max(1, min(dh, math.floor(h * s + 0.5)))
        nw = max(1, min(dw, math.floor(w * s + 0.5)))
        return cls(src_hw, dst_hw, (dh - nh) // 2, (dw - nw) // 2, nh, nw)


def _interp(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """Area when shrinking, linear when enlarging (the training code's choice)."""
    return cv2.INTER_AREA if src_hw[0] > dst_hw[0] or src_hw[1] > dst_hw[1] else cv2.INTER_LINEAR


def percentile_range(gray: npt.NDArray[np.generic]) -> tuple[float, float]:
    """0.5th and 99.5th percentiles of an integer image, equal to ``np.percentile`` (linear method).

    Computed from a histogram of the integer values (O(n), no sort), which is several times faster than
    ``np.percentile`` on a 16-bit frame.
    """
    flat = gray.reshape(-1)
    if flat.dtype in (np.uint8, np.uint16) and flat.size:
        cum = np.cumsum(np.bincount(flat, minlength=1))
        n = int(cum[-1])
        out: list[float] = []
        for q in (_P_LOW, _P_HIGH):
            k = q / 100.0 * (n - 1)
            lo_rank, hi_rank = math.floor(k), math.ceil(k)
            v_lo = float(np.searchsorted(cum, lo_rank + 1))
            v_hi = float(np.searchsorted(cum, hi_rank + 1))
            out.append(v_lo + (v_hi - v_lo) * (k - lo_rank))
        return out[0], out[1]
    lo, hi = np.percentile(flat.astype(np.float32), (_P_LOW, _P_HIGH))
    return float(lo), float(hi)


class Preprocessor:
    """Turns frames into the network input and network outputs back into frame geometry.

    Args:
        input_hw: network input ``(height, width)``.
        channels: network input channels (the luminance is repeated into each, unless ``temporal``).
        normalization: the model card's rule.
        geometry: ``"stretch"`` or ``"letterbox"``.
        out: optional caller-owned ``(1, channels, H, W)`` float32 C-contiguous buffer to write the tensor
            into (e.g. an array bound to ONNX Runtime, or pinned host memory for TensorRT).
        single_region_classes: classes whose restored label map is reduced to one region
            (:func:`keep_main_region`), as the model card's ``postprocess`` says.
        instrument_seed_prob: when above 0, instrument regions with no pixel at this instrument
            probability are cleared before restoring (:func:`keep_seeded_regions`; card ``postprocess``).
        temporal: the network takes ``[current plane, current plane - previous plane]`` (``channels`` must
            be 2); the preprocessor keeps the previous plane until :meth:`reset` or a geometry change.
    """

    def __init__(
        self,
        input_hw: tuple[int, int],
        channels: int = 1,
        normalization: Normalization | None = None,
        geometry: Geometry = "stretch",
        out: npt.NDArray[np.float32] | None = None,
        *,
        single_region_classes: tuple[int, ...] = (),
        temporal: bool = False,
        instrument_seed_prob: float = 0.0,
    ) -> None:
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.single_region_classes = tuple(int(c) for c in single_region_classes)
        if not 0.0 <= instrument_seed_prob < 1.0:
            raise PreprocessError(f"instrument seed probability {instrument_seed_prob} is not in [0, 1)")
        self.instrument_seed_prob = float(instrument_seed_prob)
        self.channels = int(channels)
        self.temporal = bool(temporal)
        if self.temporal and self.channels != 2:
            raise PreprocessError(
                f"a temporal model takes 2 input channels (current frame, current minus previous), "
                f"not {self.channels}"
            )
        self.normalization = normalization or Normalization()
        self.mode: Geometry = geometry
        shape = (1, self.channels, *self.input_hw)
        if out is None:
            out = np.zeros(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise PreprocessError(
                f"output buffer must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}"
            )
        self.tensor: npt.NDArray[np.float32] = out
        self._key: tuple[Any, ...] | None = None
        self._geom: FrameGeometry | None = None
        self._full: npt.NDArray[np.float32] = np.empty((0, 0), dtype=np.float32)
        self._pad_value = 0.0
        # Temporal models: the previous frame's plane at network resolution (pad included), and whether it
        # belongs to the current stream. Allocated once; reset() only clears the flag.
        self._previous: npt.NDArray[np.float32] = np.zeros(
            self.input_hw if self.temporal else (0, 0), dtype=np.float32
        )
        self._has_previous = False

    # ------------------------------------------------------------------ forward
    @property
    def geometry(self) -> FrameGeometry | None:
        """Geometry of the last prepared frame (None before the first)."""
        return self._geom

    def reset(self) -> None:
        """Forget the previous frame: the next frame's difference channel is zero (a stream's first frame).

        Call it where a new stream, source or file starts. Cheap (no reallocation); call it on the thread
        that calls :meth:`prepare`.
        """
        self._has_previous = False

    def _configure(self, gray: npt.NDArray[np.generic]) -> None:
        h, w = int(gray.shape[0]), int(gray.shape[1])
        key = (h, w, gray.dtype.str)
        if key == self._key:
            return
        self._geom = FrameGeometry.compute((h, w), self.input_hw, self.mode)
        self._full = np.empty((h, w), dtype=np.float32)
        # Padding value: what a raw 0 normalises to (0 for every rule we know, offset for "scale").
        if self.normalization.kind == "scale":
            _, b = self.normalization.affine(gray.dtype)
            pad = b
            if self.normalization.clip is not None:
                pad = min(max(pad, self.normalization.clip[0]), self.normalization.clip[1])
            self._pad_value = float(pad)
        else:
            self._pad_value = 0.0
        self.tensor.fill(self._pad_value)
        self._has_previous = False  # a frame of another geometry is not this stream's previous frame
        self._key = key
        logger.debug(
            "Preprocessor configured for %dx%d %s -> %s (%s)", w, h, gray.dtype, self.input_hw, self.mode
        )

    @staticmethod
    def to_gray(image: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """2-D luminance view/array of a ``(H, W)`` or ``(H, W, 1..4)`` frame (BT.601 for colour)."""
        if image.ndim == 2:
            return image
        if image.ndim == 3 and image.shape[2] in (1, 2):  # gray (+ alpha)
            return image[:, :, 0]
        if image.ndim == 3 and image.shape[2] in (3, 4):
            # Same arithmetic as engines.models.preprocess.to_gray (float BT.601, rounded to the dtype).
            luma = image[:, :, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            if np.issubdtype(image.dtype, np.integer):
                info = np.iinfo(image.dtype)  # type: ignore[type-var]
                return np.clip(np.rint(luma), info.min, info.max).astype(image.dtype)
            return luma
        raise PreprocessError(f"expected a (H, W) or (H, W, 1..4) image, got shape {image.shape}")

    def _normalise_into(self, gray: npt.NDArray[np.generic], out: npt.NDArray[np.float32]) -> None:
        norm = self.normalization
        if norm.kind == "scale":
            a, b = norm.affine(gray.dtype)
            np.multiply(gray, np.float32(a), out=out, casting="unsafe")
            if b != 0.0:
                np.add(out, np.float32(b), out=out)
            if norm.clip is not None:
                np.clip(out, norm.clip[0], norm.clip[1], out=out)
            return
        # percentile rule
        if gray.dtype == np.uint8:
            np.multiply(gray, np.float32(1.0 / 255.0), out=out, casting="unsafe")
        elif np.issubdtype(gray.dtype, np.integer) or gray.dtype == np.bool_:
            lo, hi = percentile_range(gray)
            np.subtract(gray, np.float32(lo), out=out, casting="unsafe")
            np.multiply(out, np.float32(1.0 / max(hi - lo, 1.0)), out=out)
            np.clip(out, 0.0, 1.0, out=out)
        else:
            np.clip(gray, 0.0, 1.0, out=out, casting="unsafe")

    def prepare(self, image: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        """Write the network input for ``image`` into :attr:`tensor` and return it (the same buffer).

        Normalises at the frame's resolution, then resizes into the input (area when shrinking, linear when
        enlarging), then repeats the plane into every channel, or, for a temporal model, writes the plane
        minus the previous frame's plane into channel 1 (zero without a previous frame).
        """
        gray = self.to_gray(image)
        self._configure(gray)
        geom = self._geom
        assert geom is not None
        plane = self.tensor[0, 0]
        if (geom.nh, geom.nw) == geom.src_hw and (geom.y0, geom.x0) == (0, 0) and geom.src_hw == geom.dst_hw:
            self._normalise_into(gray, plane)
        else:
            self._normalise_into(gray, self._full)
            dst = plane[geom.y0 : geom.y0 + geom.nh, geom.x0 : geom.x0 + geom.nw]
            cv2.resize(
                self._full,
                (geom.nw, geom.nh),
                dst=dst,
                interpolation=_interp(geom.src_hw, (geom.nh, geom.nw)),
            )
        if self.temporal:
            diff = self.tensor[0, 1]
            if self._has_previous:
                np.subtract(plane, self._previous, out=diff)
            else:
                diff.fill(0.0)
            np.copyto(self._previous, plane)
            self._has_previous = True
            return self.tensor
        for c in range(1, self.channels):
            np.copyto(self.tensor[0, c], plane)
        return self.tensor

    # ------------------------------------------------------------------ backward
    def _crop(self, a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        geom = self._geom
        if geom is None:
            raise PreprocessError("restore called before prepare")
        a = a.reshape(a.shape[-2:]) if a.ndim > 2 else a
        if a.shape != geom.dst_hw:
            raise PreprocessError(f"output map has shape {a.shape}, expected {geom.dst_hw}")
        return a[geom.y0 : geom.y0 + geom.nh, geom.x0 : geom.x0 + geom.nw]

    def restore_labels(
        self, labels: npt.NDArray[np.generic], prob: npt.NDArray[np.floating[Any]] | None = None
    ) -> npt.NDArray[np.uint8]:
        """Network label map ``(H, W)`` (or ``(1, H, W)``, any integer type) -> fresh ``(h, w)`` uint8.

        ``prob`` (the network's instrument probability map, same shape) is needed for the seeded-region
        rule; without it, or with the rule off, the labels are restored as they are.
        """
        if self.instrument_seed_prob > 0.0 and prob is not None:
            # at network resolution (64 KiB at 256x256), on a copy: ``labels`` may be a bound output buffer
            net = np.array(labels.reshape(labels.shape[-2:]), dtype=np.uint8, copy=True)
            keep_seeded_regions(net, prob.reshape(prob.shape[-2:]), INSTRUMENT, self.instrument_seed_prob)
            labels = net
        out = self._restore(labels, np.uint8, cv2.INTER_NEAREST)
        for c in self.single_region_classes:
            keep_main_region(out, c)
        return out

    def restore_prob(self, prob: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        """Network probability map ``(H, W)`` -> fresh ``(h, w)`` float32 (linear interpolation)."""
        return self._restore(prob, np.float32, cv2.INTER_LINEAR)

    def _restore(self, m: npt.NDArray[Any], dtype: type[_T], interpolation: int) -> npt.NDArray[_T]:
        """Crop the letterbox, convert and resize back to the frame in one fresh array (a single copy when
        no resize is needed: the conversion is the copy)."""
        crop = self._crop(m)
        assert self._geom is not None
        h, w = self._geom.src_hw
        if crop.shape == (h, w):
            return np.array(crop, dtype=dtype, copy=True)
        src = crop if crop.dtype == dtype else crop.astype(dtype)
        out: npt.NDArray[_T] = np.empty((h, w), dtype=dtype)
        cv2.resize(src, (w, h), dst=out, interpolation=interpolation)
        return out


def keep_seeded_regions(
    labels: npt.NDArray[np.uint8],
    prob: npt.NDArray[np.floating[Any]],
    cls: int,
    seed_prob: float,
    background: int = 0,
) -> None:
    """Clear (in place) every 8-connected region of class ``cls`` that holds no pixel with ``prob`` at or
    above ``seed_prob``: hysteresis thresholding, as Canny links weak edges to strong ones.

    The calibrated instrument logit bias does two jobs with one number: it keeps needle-free frames free of
    a needle (which wants a high bias) and sets where the needle's mask ends (which wants a low one). Run
    s33 showed the cost: validation instrument Dice 0.89 at bias 1 and 0.78 at the bias 8 that holds
    fluoroscopy false detections to 2 %. With seeds the label decision keeps a low bias, and a region is
    kept only where the network is sure of it somewhere; a false needle is rarely sure anywhere.
    """
    mine = labels == cls
    if not mine.any():
        return
    strong = mine & (prob >= seed_prob)
    if not strong.any():
        labels[mine] = background
        return
    n, comp = cv2.connectedComponents(mine.view(np.uint8), connectivity=8)
    if n <= 2:
        return  # one region, and it is seeded
    seeded = np.zeros(n, dtype=bool)
    seeded[comp[strong]] = True
    labels[mine & ~seeded[comp]] = background


def keep_main_region(labels: npt.NDArray[np.uint8], cls: int, background: int = 0) -> None:
    """Reduce class ``cls`` in ``labels`` (in place) to its main region; other pixels become background.

    For a class with one instance per image (the biopsy target), stray islands elsewhere in the frame are
    false positives: dropping all but the largest is the connected-component post-processing nnU-Net
    adopts when it raises validation Dice, and this project enables it per model through the card on the
    same evidence. Connectivity is taken over the class *and every other foreground class*, because a
    needle drawn through a lesion cuts it in two in a label map, and both halves are the lesion: the
    region kept is the connected foreground piece holding the most ``cls`` pixels. 0.09 ms at 256x256
    (timeit on a phantom label map).
    """
    mine = labels == cls
    if not mine.any():
        return
    fg = (labels != background).view(np.uint8)
    n, comp = cv2.connectedComponents(fg, connectivity=8)
    if n <= 2:
        return
    counts = np.bincount(comp[mine], minlength=n)
    main = int(np.argmax(counts))
    labels[mine & (comp != main)] = background
