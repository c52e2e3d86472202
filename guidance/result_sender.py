"""Send results back to the OpenIGTLink peer so 3D Slicer (or PlusServer clients) can show them.

Device names (documented in the README):

* ``GuidanceLabels`` — IMAGE, uint8 label map at the source frame's geometry and matrix (0 background,
  1 instrument, 2 target), so Slicer overlays it exactly on the B-mode/fluoro image it came from.
* ``GuidanceTip`` — POINT with one fiducial ``tip`` at the filtered needle tip, in the reference frame's
  millimetres (the image's IMAGE matrix applied to the tip pixel); sent only when an instrument is seen.
* ``GuidanceTipToImage`` — TRANSFORM placing the tip (translation) with the needle axis as its x axis, for
  Slicer's transform-driven models (a needle model follows it).

Each message carries the source frame's sender timestamp and a ``FrameSeq`` metadata entry, so a receiver can
pair results with frames. Sending happens on the inference worker after the result is published, so it never
delays the display.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from guidance.results import GuidanceResult
from streaming.igtl import IGTLClient, PointItem, encode_image, encode_point, encode_transform

logger = logging.getLogger(__name__)

LABELS_DEVICE = "GuidanceLabels"
TIP_DEVICE = "GuidanceTip"
TIP_TRANSFORM_DEVICE = "GuidanceTipToImage"


def pixel_to_reference(result: GuidanceResult, x: float, y: float) -> npt.NDArray[np.float64]:
    """Map pixel ``(x, y)`` (column, row; pixel centres at integers) to reference-frame millimetres.

    The OpenIGTLink IMAGE matrix puts the image *centre* at its translation, with columns 0/1 the i/j axes
    scaled by the spacing; the centre of a W-pixel row is at ``(W - 1) / 2``.
    """
    f = result.frame
    m = f.image_to_reference
    di = x - (f.width - 1) / 2.0
    dj = y - (f.height - 1) / 2.0
    out: npt.NDArray[np.float64] = m[:3, 0] * di + m[:3, 1] * dj + m[:3, 3]
    return out


class ResultSender:
    """Encodes a :class:`GuidanceResult` as IGTL messages and sends them through ``client``."""

    def __init__(self, client: IGTLClient, *, send_labels: bool = True, send_tip: bool = True) -> None:
        self._client = client
        self._send_labels = send_labels
        self._send_tip = send_tip
        self.sent = 0
        self.failed = 0

    def __call__(self, result: GuidanceResult) -> None:
        f = result.frame
        meta = {"FrameSeq": str(f.seq), "SourceDevice": f.device}
        ts = f.sender_time_ns
        ok = True
        if self._send_labels:
            ok &= self._client.send(
                encode_image(
                    result.labels, LABELS_DEVICE, matrix=f.image_to_reference, timestamp_ns=ts, metadata=meta
                )
            )
        inst = result.interpretation.instrument
        if self._send_tip and inst is not None:
            tip = pixel_to_reference(result, *inst.tip_px)
            ok &= self._client.send(
                encode_point(
                    [
                        PointItem(
                            "tip",
                            (float(tip[0]), float(tip[1]), float(tip[2])),
                            group="Guidance",
                            diameter=2.0,
                        )
                    ],
                    TIP_DEVICE,
                    timestamp_ns=ts,
                    metadata=meta,
                )
            )
            axis = (
                f.image_to_reference[:3, 0] * inst.direction[0]
                + f.image_to_reference[:3, 1] * inst.direction[1]
            )
            norm = float(np.linalg.norm(axis))
            t = np.eye(4)
            if norm > 0:
                x_axis = axis / norm
                z_axis = np.cross(f.image_to_reference[:3, 0], f.image_to_reference[:3, 1])
                z_norm = float(np.linalg.norm(z_axis))
                z_axis = z_axis / z_norm if z_norm > 0 else np.array([0.0, 0.0, 1.0])
                t[:3, 0], t[:3, 2] = x_axis, z_axis
                t[:3, 1] = np.cross(z_axis, x_axis)
            t[:3, 3] = tip
            ok &= self._client.send(encode_transform(t, TIP_TRANSFORM_DEVICE, timestamp_ns=ts, metadata=meta))
        if ok:
            self.sent += 1
        else:
            self.failed += 1
