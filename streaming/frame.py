"""The unit of image data that crosses threads: one received (or simulated, or replayed) frame."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

_IDENTITY = np.eye(4, dtype=np.float64)
_IDENTITY.setflags(write=False)
_EMPTY: Mapping[str, str] = MappingProxyType({})


def _readonly(a: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """Return ``a`` made read-only without copying (a view when ``a`` is owned elsewhere)."""
    if a.flags.writeable:
        a = a.view()
        a.setflags(write=False)
    return a


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One 2-D image with its geometry and timing.

    Frames are immutable and are passed by reference on the hot path; ``pixels`` is a read-only array in
    native byte order, shape ``(rows, cols)`` or ``(rows, cols, components)``.

    Attributes:
        seq: receiver-side sequence number (monotonic per source, starts at 0).
        device: OpenIGTLink device name (e.g. ``Image_Reference``).
        pixels: read-only image array.
        spacing_mm: pixel spacing ``(x, y)`` in millimetres, i.e. (column step, row step).
        image_to_reference: 4x4 homogeneous matrix (IGTL IMAGE matrix, origin at the image centre per
            OpenIGTLink; we keep it exactly as sent).
        sender_time_ns: sender's wall-clock timestamp (ns since the Unix epoch) from the OpenIGTLink
            header, or ``None`` when the sender left it at zero.
        receive_wall_ns: our wall clock (``time.time_ns``) when the last byte arrived; compared with
            ``sender_time_ns`` on the same host to get transport latency.
        receive_ns: our monotonic clock (``time.perf_counter_ns``) when the last byte arrived; all
            pipeline stages are stamped on this clock.
        metadata: OpenIGTLink v2 metadata (key -> value), read-only.
        message_id: OpenIGTLink v2 message id (0 for v1).
    """

    seq: int
    device: str
    pixels: npt.NDArray[np.generic]
    spacing_mm: tuple[float, float] = (1.0, 1.0)
    image_to_reference: npt.NDArray[np.float64] = field(default_factory=lambda: _IDENTITY)
    sender_time_ns: int | None = None
    receive_wall_ns: int = 0
    receive_ns: int = 0
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    message_id: int = 0

    def __post_init__(self) -> None:
        if self.pixels.ndim not in (2, 3):
            raise ValueError(
                f"Frame pixels must be 2-D or 3-D (rows, cols[, components]), got {self.pixels.shape}"
            )
        object.__setattr__(self, "pixels", _readonly(self.pixels))
        m = np.asarray(self.image_to_reference, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"image_to_reference must be 4x4, got {m.shape}")
        object.__setattr__(self, "image_to_reference", _readonly(m))
        if not isinstance(self.metadata, MappingProxyType):
            object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def components(self) -> int:
        return 1 if self.pixels.ndim == 2 else int(self.pixels.shape[2])

    @staticmethod
    def now() -> tuple[int, int]:
        """Return ``(receive_wall_ns, receive_ns)`` stamped now, for producers building a Frame."""
        return time.time_ns(), time.perf_counter_ns()
