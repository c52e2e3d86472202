"""Read a native recording (``streaming.recording.RecordingReader``) into what the DICOM writers take.

Frames are streamed into a temporary raw file and mapped back as a read-only ``np.memmap`` so a long
recording never has to fit in memory. Masks come, in order of preference, from the caller, from result
records of encoding :data:`LABELS_ENCODING` stored in the recording, or are left out.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from guidance.dicom.study import PatientStudy
from streaming.frame import Frame

logger = logging.getLogger(__name__)

#: Result record encoding we understand: zlib-compressed uint8 label map at the frame's geometry, C order.
LABELS_ENCODING = "labels-u8-zlib"

Progress = Callable[[str, int], None]


@dataclass(frozen=True, slots=True, eq=False)
class SpilledFrames:
    """Frames of one device mapped from a temporary file, with their clocks and geometry."""

    pixels: npt.NDArray[np.generic]  # (N, rows, cols) memmap, read-only
    receive_ns: npt.NDArray[np.int64]  # monotonic clock of each frame
    seqs: npt.NDArray[np.int64]
    spacing_mm: tuple[float, float]
    start_wall_ns: int
    raw_path: Path

    @property
    def times_s(self) -> npt.NDArray[np.float64]:
        return self.receive_ns.astype(np.float64) / 1e9

    @property
    def start_time(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.start_wall_ns / 1e9)

    def release(self) -> None:
        """Delete the temporary file (POSIX keeps a live mapping valid until it is dropped)."""
        self.raw_path.unlink(missing_ok=True)


def spill_frames(frames: Iterable[Frame], work_dir: Path, progress: Progress | None = None) -> SpilledFrames:
    """Write grayscale frames to ``work_dir/.frames-*.raw`` and map them back (constant memory)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    raw = work_dir / f".frames-{id(frames):x}.raw"
    times: list[int] = []
    seqs: list[int] = []
    shape: tuple[int, int] | None = None
    dtype: np.dtype[Any] | None = None
    spacing = (1.0, 1.0)
    wall = 0
    try:
        with open(raw, "wb") as fh:
            for f in frames:
                p = f.pixels[:, :, 0] if f.pixels.ndim == 3 and f.pixels.shape[2] == 1 else f.pixels
                if shape is None:
                    shape, dtype, spacing, wall = (
                        (int(p.shape[0]), int(p.shape[1])),
                        p.dtype,
                        f.spacing_mm,
                        f.receive_wall_ns,
                    )
                if p.shape != shape or p.dtype != dtype:
                    logger.warning("Skipping frame %d: geometry/type changed mid-recording", f.seq)
                    continue
                fh.write(np.ascontiguousarray(p).data.cast("B"))
                times.append(f.receive_ns)
                seqs.append(f.seq)
                if progress is not None and len(times) % 100 == 0:
                    progress("reading", len(times))
        if shape is None or dtype is None:
            raise ValueError("the recording holds no image frames")
        mm: npt.NDArray[np.generic] = np.memmap(raw, dtype=dtype, mode="r", shape=(len(times), *shape))
    except BaseException:
        raw.unlink(missing_ok=True)
        raise
    return SpilledFrames(mm, np.asarray(times, np.int64), np.asarray(seqs, np.int64), spacing, wall, raw)


class RecordedMasks(Sequence[npt.NDArray[np.uint8]]):
    """Label maps of a recording kept zlib-compressed and decoded on access (a 1,800-frame 512x512
    recording would otherwise hold ~470 MB of masks in memory). Frames without a result read as empty."""

    def __init__(self, payloads: Mapping[int, bytes], n: int, shape: tuple[int, int]) -> None:
        self._payloads = dict(payloads)
        self._n = n
        self._shape = shape

    def __len__(self) -> int:
        return self._n

    def _one(self, i: int) -> npt.NDArray[np.uint8]:
        if not -self._n <= i < self._n:
            raise IndexError(i)
        raw = self._payloads.get(i % self._n)
        if raw is None:
            return np.zeros(self._shape, np.uint8)
        try:
            return np.frombuffer(zlib.decompress(raw), np.uint8).reshape(self._shape)
        except (zlib.error, ValueError) as exc:
            raise ValueError(f"recorded label map of frame {i} is unreadable or of another size") from exc

    @overload
    def __getitem__(self, i: int) -> npt.NDArray[np.uint8]: ...
    @overload
    def __getitem__(self, i: slice) -> list[npt.NDArray[np.uint8]]: ...
    def __getitem__(self, i: int | slice) -> npt.NDArray[np.uint8] | list[npt.NDArray[np.uint8]]:
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(self._n))]
        return self._one(i)


def masks_from_results(
    results: Iterable[Any], receive_ns: npt.NDArray[np.int64], shape: tuple[int, int]
) -> RecordedMasks | None:
    """Label maps for the frames received at ``receive_ns`` from recorded results of
    :data:`LABELS_ENCODING`; None if absent. Decoded lazily (see :class:`RecordedMasks`).

    Results are paired with frames by the frame's monotonic receive time, which the recorder stores with
    both: sequence numbers restart when a recording starts mid-session, receive times do not. Frames the AI
    skipped (a newer one arrived first) get an empty mask.
    """
    wanted = {int(t): i for i, t in enumerate(receive_ns)}
    payloads: dict[int, bytes] = {}
    for r in results:
        if r.encoding != LABELS_ENCODING or int(r.receive_ns) not in wanted:
            continue
        payloads[wanted[int(r.receive_ns)]] = bytes(r.payload)  # geometry checked when decoded
    return RecordedMasks(payloads, len(receive_ns), shape) if payloads else None


def study_from_metadata(meta: Mapping[str, Any]) -> PatientStudy | None:
    """A PatientStudy from the recording's ``metadata["study"]`` (keys = PatientStudy field names)."""
    raw = meta.get("study")
    if not isinstance(raw, Mapping):
        return None
    names = {f.name for f in dataclasses.fields(PatientStudy)}
    kwargs = {k: str(v) for k, v in raw.items() if k in names}
    if "patient_name" not in kwargs or "patient_id" not in kwargs:
        return None
    return PatientStudy(**kwargs).validated()


def open_recording(
    path: Path, device: str | None, work_dir: Path, progress: Progress | None = None
) -> tuple[SpilledFrames, RecordedMasks | None, Mapping[str, Any]]:
    """Frames (spilled), recorded masks (or None) and metadata of a recording file."""
    from streaming.recording import RecordingReader

    reader = RecordingReader(path).open()
    spilled = spill_frames(reader.frames(device), work_dir, progress)
    shape = (int(spilled.pixels.shape[1]), int(spilled.pixels.shape[2]))
    masks = masks_from_results(reader.results(), spilled.receive_ns, shape) if reader.result_count else None
    return spilled, masks, reader.metadata
