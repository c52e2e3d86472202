"""Backend registry: backends register in priority order and say whether they can run here.

``create("auto")`` picks the highest-priority available backend (tensorrt > torch on CUDA >
onnxruntime on CPU > classical). Naming an unavailable backend raises :class:`EngineUnavailable` whose
message is a one-line reason. Probes must be cheap and must not import heavy packages at module import
time; they run only when the registry is queried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.base import EngineUnavailable, SegmentationEngine

logger = logging.getLogger(__name__)

Probe = Callable[[], str | None]  # returns None when available, else the reason it is not
Factory = Callable[..., SegmentationEngine]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    priority: int  # higher wins in "auto"
    probe: Probe
    factory: Factory
    description: str = ""
    auto: bool = True  # may "auto" pick it


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # empty when available
    description: str
    priority: int


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> None:
    _REGISTRY[spec.name] = spec


def _ensure_builtin() -> None:
    # Import for side effect: each backend module registers itself. Only light modules are imported
    # here; they import their heavy packages lazily inside probe()/factory().
    import engines.backends  # noqa: F401


def backends() -> list[BackendStatus]:
    """Every registered backend, highest priority first, with availability and reason."""
    _ensure_builtin()
    out = []
    for spec in sorted(_REGISTRY.values(), key=lambda s: -s.priority):
        try:
            reason = spec.probe()
        except Exception as exc:  # noqa: BLE001 - a probe must never take the app down
            reason = f"probe failed: {exc}"
        out.append(BackendStatus(spec.name, reason is None, reason or "", spec.description, spec.priority))
    return out


def resolve(name: str = "auto") -> str:
    """Return the backend name ``create(name)`` would use, or raise EngineUnavailable."""
    _ensure_builtin()
    if name == "auto":
        for status in backends():
            if status.available and _REGISTRY[status.name].auto:
                return status.name
        raise EngineUnavailable("no inference backend is available")
    spec = _REGISTRY.get(name)
    if spec is None:
        raise EngineUnavailable(f"unknown engine backend {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    reason = spec.probe()
    if reason is not None:
        raise EngineUnavailable(f"engine backend {name!r} is not available: {reason}")
    return name


def create(name: str = "auto", **options: Any) -> SegmentationEngine:
    """Create (not load) an engine. ``options`` go to the backend factory (e.g. ``model=path``)."""
    chosen = resolve(name)
    logger.info("Engine backend: %s (requested %s)", chosen, name)
    return _REGISTRY[chosen].factory(**options)
