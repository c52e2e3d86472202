"""Raw pixels -> network input, exactly as the model card's ``normalization`` block describes (numpy only).

Normalisation (``NORMALIZATION_ID`` = ``"uint8/255;uint16:p0.5-p99.5;float:clip01"``):

* ``uint8``: ``x / 255``.
* ``uint16`` (and other integer types wider than 8 bits): per-frame percentile stretch,
  ``(x - p0.5) / max(p99.5 - p0.5, 1)`` clipped to [0, 1]. 12-bit detectors, 16-bit detectors and
  window/level choices all land in the same range; a flat frame maps to 0.
* floating point: taken as already in [0, 1] and clipped.
* colour (H, W, 3|4): converted to luminance first (ITU-R BT.601 weights, alpha dropped); (H, W, 1) is
  squeezed.

The result is resized (area interpolation when shrinking, linear when enlarging) to the model's
``(height, width)`` and returned as a contiguous ``(1, 1, height, width)`` float32 NCHW array. Label maps
are resized back to the frame with nearest-neighbour (:func:`labels_to_frame`).

Temporal models (card ``input.channel_meaning`` = :data:`TEMPORAL_CHANNELS`) take a second channel: the
current plane minus the previous frame's plane of the same stream, both normalised and resized as above
(:func:`temporal_input`). It is zero on a stream's first frame, so there the network sees what a
single-frame model sees. A needle advances between frames and the tissue around it does not (or moves with
the whole image); a needle-like distractor line does not advance.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

NORMALIZATION_ID = "uint8/255;uint16:p0.5-p99.5;float:clip01"
PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5
#: ``input.channel_meaning`` of single-frame and of temporal models.
SINGLE_FRAME_CHANNELS: tuple[str, ...] = ("current frame",)
TEMPORAL_CHANNELS: tuple[str, ...] = ("current frame", "current frame minus previous frame")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_gray(image: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """Return a 2-D view/array of ``image`` (colour -> luminance, keeping the integer dtype)."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        luma: npt.NDArray[np.float32] = image[:, :, :3].astype(np.float32) @ _LUMA
        if np.issubdtype(image.dtype, np.integer):
            top = float(np.iinfo(image.dtype.type).max)  # type: ignore[type-var]
            rounded: npt.NDArray[np.generic] = np.clip(np.rint(luma), 0, top).astype(image.dtype)
            return rounded
        return luma
    raise ValueError(f"expected a (H, W) or (H, W, 1|3|4) image, got shape {image.shape}")


def normalize(image: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """Map a 2-D (or colour) image to float32 in [0, 1] at its own size (see module docstring)."""
    gray = to_gray(image)
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) * np.float32(1.0 / 255.0)
    if np.issubdtype(gray.dtype, np.integer) or gray.dtype == np.bool_:
        g = gray.astype(np.float32)
        lo, hi = np.percentile(g, (PERCENTILE_LOW, PERCENTILE_HIGH))
        scale = np.float32(1.0 / max(float(hi - lo), 1.0))
        out: npt.NDArray[np.float32] = np.clip((g - np.float32(lo)) * scale, 0.0, 1.0)
        return out
    return np.clip(gray.astype(np.float32), 0.0, 1.0)


def resize(plane: npt.NDArray[np.float32], height: int, width: int) -> npt.NDArray[np.float32]:
    """Resize a float32 plane to ``(height, width)`` (area when shrinking, linear when enlarging)."""
    if plane.shape == (height, width):
        return plane
    shrinking = plane.shape[0] > height or plane.shape[1] > width
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out: npt.NDArray[np.float32] = np.asarray(
        cv2.resize(plane, (width, height), interpolation=interp), dtype=np.float32
    )
    return out


def to_input(image: npt.NDArray[np.generic], height: int, width: int) -> npt.NDArray[np.float32]:
    """Raw frame pixels -> contiguous ``(1, 1, height, width)`` float32 network input."""
    plane = resize(normalize(image), height, width)
    return np.ascontiguousarray(plane[np.newaxis, np.newaxis], dtype=np.float32)


def temporal_input(
    current: npt.NDArray[np.float32], previous: npt.NDArray[np.float32] | None
) -> npt.NDArray[np.float32]:
    """Two network-resolution planes (normalised, resized) -> contiguous ``(2, H, W)`` float32:
    ``[current, current - previous]``; the difference is zero when ``previous`` is None (first frame)."""
    out = np.empty((2, *current.shape), dtype=np.float32)
    out[0] = current
    if previous is None:
        out[1] = 0.0
    else:
        np.subtract(current, previous, out=out[1])
    return out


def labels_to_frame(labels: npt.NDArray[np.generic], height: int, width: int) -> npt.NDArray[np.uint8]:
    """Resize a network label map back to the frame's ``(height, width)`` with nearest neighbour."""
    lab = np.asarray(labels).astype(np.uint8, copy=False)
    if lab.ndim == 3:
        lab = lab[0]
    if lab.shape == (height, width):
        return lab
    out: npt.NDArray[np.uint8] = np.asarray(
        cv2.resize(lab, (width, height), interpolation=cv2.INTER_NEAREST), dtype=np.uint8
    )
    return out


def prob_to_frame(prob: npt.NDArray[np.float32], height: int, width: int) -> npt.NDArray[np.float32]:
    """Resize a network probability map back to the frame's ``(height, width)`` (linear)."""
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim == 3:
        p = p[0]
    if p.shape == (height, width):
        return p
    out: npt.NDArray[np.float32] = np.asarray(
        cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.float32
    )
    return out
