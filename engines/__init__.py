"""Inference: the segmentation-engine protocol, backends, model assets, engine cache, tensor pre/post.

Knows nothing of ``streaming``, ``guidance`` or ``ui`` (checked by import-linter). Heavy imports
(onnxruntime, torch, tensorrt) happen inside the backend that needs them, only when it is chosen.
"""

from engines.base import (
    CLASS_NAMES,
    EngineError,
    EngineInfo,
    EngineUnavailable,
    SegmentationEngine,
    SegmentationOutput,
)

__all__ = [
    "CLASS_NAMES",
    "EngineError",
    "EngineInfo",
    "EngineUnavailable",
    "SegmentationEngine",
    "SegmentationOutput",
]
