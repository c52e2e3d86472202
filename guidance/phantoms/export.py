"""Write a phantom sequence as a replayable recording plus a ground-truth sidecar (``guidance simulate``).

Output:

* ``--out FILE`` (``.mcap``): a native recording (:class:`streaming.recording.RecordingWriter`) of
  OpenIGTLink v2 IMAGE messages, device ``Image_Reference``, metadata ``FrameIndex`` and ``Modality``,
  stamped at exactly ``1/fps`` intervals (sender and receive times), so replay at original timing plays it
  at the phantom's frame rate.
* ``FILE`` with suffix ``.truth.npz`` beside it (see :func:`truth_path`): the ground truth, one row per
  frame (``numpy.load`` it):

  ========================  ==============  =====================================================
  key                       shape / dtype   meaning
  ========================  ==============  =====================================================
  ``index``                 (N,) int64      frame index (= FrameIndex metadata of the message)
  ``time_s``                (N,) float64    ``index / fps``
  ``instrument_present``    (N,) bool       any instrument pixel labelled
  ``tip_px``                (N, 2) float64  tip (x, y); NaN when absent
  ``entry_px``              (N, 2) float64  where the instrument enters the field; NaN when absent
  ``axis_angle_deg``        (N,) float64    entry->tip angle to the x axis in [0, 180); NaN
  ``tip_direction_deg``     (N,) float64    tangent at the tip, angle to the x axis in [0, 180); NaN
  ``target_centroid_px``    (N, 2) float64  lesion centroid; NaN when none in view
  ``target_radius_px``      (N,) float64    equivalent lesion radius (0 when none)
  ``labels``                (N, H, W) uint8 label maps (0 background, 1 instrument, 2 target)
  ``spacing_mm``            (2,) float64    pixel spacing (x, y)
  ``meta``                  () str          JSON: modality, seed, fps, size, bit depth, phantom config
  ========================  ==============  =====================================================
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guidance.phantoms import PhantomFrame, make_phantom
from streaming.igtl.codec import encode_image
from streaming.recording import IGTL_HEADER_SIZE, RecordingWriter

logger = logging.getLogger(__name__)

DEVICE_NAME = "Image_Reference"

__all__ = ["DEVICE_NAME", "load_truth", "truth_path", "write_recording"]


@dataclass(frozen=True, slots=True)
class _SimMessage:
    """A generated message in the shape :meth:`RecordingWriter.write_message` takes."""

    header: bytes
    body: bytes
    receive_wall_ns: int
    receive_ns: int


def truth_path(recording: Path) -> Path:
    """The ground-truth sidecar of a recording: ``rec.mcap`` -> ``rec.truth.npz``."""
    return Path(recording).with_suffix(".truth.npz")


def load_truth(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Read a sidecar written by :func:`write_recording` (all arrays loaded; ``meta`` stays a JSON string)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _app_version() -> str:
    try:
        return version("guidance")
    except PackageNotFoundError:
        return "unknown"


def _nan2(p: tuple[float, float] | None) -> tuple[float, float]:
    return (math.nan, math.nan) if p is None else (float(p[0]), float(p[1]))


def write_recording(
    out: Path,
    *,
    modality: str = "us",
    frames: int,
    seed: int = 0,
    fps: float | None = None,
    width: int = 256,
    height: int = 256,
    bit_depth: int = 8,
    write_truth: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path | None:
    """Write ``frames`` phantom frames to a new recording ``out`` (and the truth sidecar).

    Returns the sidecar's path (None when ``write_truth`` is False).

    Raises:
        ValueError: bad arguments (frame count, fps, modality, size).
        FileExistsError: ``out`` or its sidecar already exists.
        streaming.recording.RecordingError: the recording could not be written.
    """
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    if Path(out).suffix.lower() != ".mcap":
        # The file is MCAP whatever it is called; a .nrrd or .mha name made `guidance segment` and the
        # sequence readers take it for a PLUS/Slicer file and fail with "not a NRRD file".
        raise ValueError(
            f"{Path(out).name}: simulate writes the app's own MCAP recording; name the file *.mcap"
        )
    fps = fps if fps is not None else (30.0 if modality == "us" else 15.0)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    kw: dict[str, Any] = {"seed": seed, "width": width, "height": height, "fps": fps}
    if modality == "fluoro":
        kw["bit_depth"] = bit_depth
    phantom = make_phantom(modality, **kw)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists (recordings are never overwritten)")
    sidecar = truth_path(out)
    if write_truth and sidecar.exists():
        raise FileExistsError(f"{sidecar} already exists")
    config = getattr(phantom, "config", None)
    meta: dict[str, Any] = {
        "app_version": _app_version(),
        "source": "simulate",
        "modality": modality,
        "seed": seed,
        "fps": fps,
        "width": width,
        "height": height,
        "bit_depth": bit_depth if modality == "fluoro" else 8,
        "phantom_config": dataclasses.asdict(config) if config is not None else {},
        "truth": sidecar.name if write_truth else "",
    }
    period_ns = round(1e9 / fps)
    wall0, perf0 = time.time_ns(), time.perf_counter_ns()
    truth: list[PhantomFrame] = []
    with RecordingWriter(out, meta) as writer:
        for i in range(frames):
            pf = phantom.frame(i)
            wall = wall0 + i * period_ns
            msg = encode_image(
                pf.image,
                DEVICE_NAME,
                spacing_mm=pf.spacing_mm,
                timestamp_ns=wall,
                metadata={"FrameIndex": str(i), "Modality": pf.modality.upper()},
            )
            writer.write_message(
                _SimMessage(
                    bytes(msg[:IGTL_HEADER_SIZE]), bytes(msg[IGTL_HEADER_SIZE:]), wall, perf0 + i * period_ns
                )
            )
            if write_truth:
                truth.append(pf)
            if progress is not None:
                progress(i + 1, frames)
    if not write_truth:
        return None
    _write_truth(sidecar, truth, meta)
    logger.info("Wrote %d simulated %s frames to %s (+ %s)", frames, modality, out, sidecar.name)
    return sidecar


def _write_truth(path: Path, frames: list[PhantomFrame], meta: dict[str, Any]) -> None:
    arrays: dict[str, Any] = {
        "index": np.array([f.index for f in frames], np.int64),
        "time_s": np.array([f.time_s for f in frames], np.float64),
        "instrument_present": np.array([f.instrument_present for f in frames], bool),
        "tip_px": np.array([_nan2(f.tip_px) for f in frames], np.float64).reshape(-1, 2),
        "entry_px": np.array([_nan2(f.entry_px) for f in frames], np.float64).reshape(-1, 2),
        "axis_angle_deg": np.array(
            [math.nan if f.axis_angle_deg is None else f.axis_angle_deg for f in frames], np.float64
        ),
        "tip_direction_deg": np.array(
            [math.nan if f.tip_direction_deg is None else f.tip_direction_deg for f in frames], np.float64
        ),
        "target_centroid_px": np.array([_nan2(f.target_centroid_px) for f in frames], np.float64).reshape(
            -1, 2
        ),
        "target_radius_px": np.array([f.target_radius_px for f in frames], np.float64),
        "labels": np.stack([f.labels for f in frames]).astype(np.uint8),
        "spacing_mm": np.array(frames[0].spacing_mm, np.float64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    fd, tmp = tempfile.mkstemp(prefix=".truth-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the sidecar is as shareable as the recording
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
