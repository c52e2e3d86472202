"""The segmentation-engine protocol shared by every backend (classical, ONNX Runtime, torch, TensorRT)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

#: Class order of every label map in the product (index = label value).
CLASS_NAMES: tuple[str, ...] = ("background", "instrument", "target")
BACKGROUND, INSTRUMENT, TARGET = 0, 1, 2


#: Name of the per-frame instrument-presence output of a model with a presence head, and of its score in
#: :attr:`SegmentationOutput.scores`.
PRESENCE = "instrument_present"
_NO_SCORES: Mapping[str, float] = MappingProxyType({})


def presence_scores(present: npt.NDArray[np.float32] | None) -> Mapping[str, float]:
    """``scores`` of one frame: ``{"instrument_present": p}`` from a model's ``(1,)`` output, else empty."""
    if present is None:
        return _NO_SCORES
    return MappingProxyType({PRESENCE: float(present.reshape(-1)[0])})


class EngineError(RuntimeError):
    """An engine failed to load or run; the message is one readable line."""


class EngineUnavailable(EngineError):
    """A named backend cannot run here (package missing, no GPU, driver too old...)."""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What :meth:`SegmentationEngine.describe` reports (shown in the UI and benchmark reports)."""

    backend: str  # "classical", "onnxruntime", "torch", "tensorrt"
    device: str  # "cpu", "cuda:0 (NVIDIA H100)", ...
    precision: str  # "fp32", "fp16", "n/a"
    input_size: tuple[int, int] | None  # (height, width) of the network input; None: native size
    model: str  # model name / version, or the algorithm's name for the classical baseline

    def label(self) -> str:
        size = f" {self.input_size[1]}x{self.input_size[0]}" if self.input_size else ""
        return f"{self.backend} ({self.device}, {self.precision}{size})"


@dataclass(frozen=True, slots=True, eq=False)
class SegmentationOutput:
    """Result of one inference at the frame's own geometry.

    Attributes:
        labels: ``(rows, cols)`` uint8 label map, values index :data:`CLASS_NAMES`.
        instrument_prob: optional ``(rows, cols)`` float32 probability of the instrument class (for
            confidence); None when the backend has none (classical baseline gives a score map in [0,1]).
        scores: per-frame scalars a model may emit (e.g. ``instrument_present``).
    """

    labels: npt.NDArray[np.uint8]
    instrument_prob: npt.NDArray[np.float32] | None = None
    scores: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


@runtime_checkable
class SegmentationEngine(Protocol):
    """Lifecycle: ``load()`` -> ``warm_up()`` -> ``infer()``* -> ``close()``. No work in ``__init__``.

    ``infer`` takes a 2-D (or HxWx1..4) uint8/uint16/float image and returns labels at that geometry.
    It is called from one inference thread only; implementations may reuse internal buffers.

    Successive ``infer`` calls are frames of one stream: a temporal model uses the previous frame too.
    ``reset()`` (on the same thread as ``infer``) starts a new stream; ``warm_up()`` ends with one, so its
    frames never reach the first real frame.
    """

    name: str

    def load(self) -> None: ...

    def warm_up(self) -> None: ...

    def infer(self, image: npt.NDArray[np.generic]) -> SegmentationOutput: ...

    def reset(self) -> None:
        """Forget temporal state (the previous frame); call when a new stream, source or file starts."""
        ...

    def describe(self) -> EngineInfo: ...

    def close(self) -> None: ...
