"""TensorRT engine and timing-cache files: keys, lookup, invalidation and atomic writes.

A serialized engine is only valid for the exact GPU model, compute capability, TensorRT version, input
shape and precision it was built for, and for the exact ONNX bytes (model sha256). All of these go into
:class:`EngineKey`; its digest names the file, and a JSON sidecar repeats the key so a stale or foreign
file is detected even if two keys ever collided on the short name. The timing cache (tactic timings) is
only GPU+TensorRT specific (:class:`TimingCacheKey`) and is shared by every model.

Files are written atomically: temp file in the same folder, ``fsync``, ``os.replace``, then ``fsync`` of
the folder, so a crash mid-write never leaves a truncated engine under the final name. An engine that
TensorRT refuses to deserialize (``deserialize_cuda_engine`` returns None: driver/TRT upgrade, corrupt
file) is removed and rebuilt (:meth:`EngineCache.invalidate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KEY_FORMAT = 1


def default_cache_dir() -> Path:
    """``$GUIDANCE_ENGINE_CACHE`` or ``$XDG_CACHE_HOME/guidance/engines`` (``~/.cache/...``)."""
    env = os.environ.get("GUIDANCE_ENGINE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guidance" / "engines"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


@dataclass(frozen=True, slots=True)
class TimingCacheKey:
    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str

    def filename(self) -> str:
        cc = f"sm{self.compute_capability[0]}{self.compute_capability[1]}"
        return f"timing-{_slug(self.gpu_name)}-{cc}-trt{_slug(self.trt_version)}.cache"


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything a serialized TensorRT engine depends on."""

    model_name: str
    model_sha256: str
    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str
    input_shape: tuple[int, ...]
    precision: str  # "fp16" | "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        d["input_shape"] = list(self.input_shape)
        d["key_format"] = KEY_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineKey:
        return cls(
            model_name=str(d["model_name"]),
            model_sha256=str(d["model_sha256"]),
            gpu_name=str(d["gpu_name"]),
            compute_capability=(int(d["compute_capability"][0]), int(d["compute_capability"][1])),
            trt_version=str(d["trt_version"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            precision=str(d["precision"]),
        )

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def filename(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        return f"{_slug(self.model_name)}-{self.precision}-{shape}-{self.digest()[:20]}.engine"

    def timing_key(self) -> TimingCacheKey:
        return TimingCacheKey(self.gpu_name, self.compute_capability, self.trt_version)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp + fsync + rename + fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened/fsynced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class EngineCache:
    """A folder of ``<key>.engine`` + ``<key>.json`` pairs and ``timing-*.cache`` files."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / key.filename()

    def meta_path(self, key: EngineKey) -> Path:
        return self.engine_path(key).with_suffix(".json")

    def timing_path(self, key: EngineKey | TimingCacheKey) -> Path:
        tk = key.timing_key() if isinstance(key, EngineKey) else key
        return self.root / tk.filename()

    def load(self, key: EngineKey) -> bytes | None:
        """The serialized engine for ``key``; None when absent, or stale/corrupt (then removed)."""
        path, meta = self.engine_path(key), self.meta_path(key)
        if not path.is_file():
            return None
        try:
            stored = EngineKey.from_dict(json.loads(meta.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            logger.warning("Engine cache entry %s has no readable key (%s); discarding it", path.name, exc)
            self.invalidate(key)
            return None
        if stored != key:
            logger.warning("Engine cache entry %s was built for another key; discarding it", path.name)
            self.invalidate(key)
            return None
        return path.read_bytes()

    def store(self, key: EngineKey, engine: bytes, extra: dict[str, Any] | None = None) -> Path:
        """Write the engine, then its key sidecar (the sidecar last: a lone engine file is never trusted)."""
        path = self.engine_path(key)
        atomic_write_bytes(path, engine)
        meta = key.to_dict()
        if extra:
            meta["build"] = extra
        atomic_write_bytes(self.meta_path(key), json.dumps(meta, indent=2).encode())
        logger.info("Stored TensorRT engine %s (%d bytes)", path.name, len(engine))
        return path

    def invalidate(self, key: EngineKey) -> None:
        """Remove the entry for ``key`` (e.g. ``deserialize_cuda_engine`` returned None)."""
        for p in (self.meta_path(key), self.engine_path(key)):
            p.unlink(missing_ok=True)

    def entries(self) -> list[EngineKey]:
        out = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                out.append(EngineKey.from_dict(json.loads(meta.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                logger.warning("Unreadable engine cache metadata %s", meta.name)
        return out

    def prune_model(self, key: EngineKey) -> int:
        """Remove entries of the same model name built for anything but ``key`` (old hashes, old TRT)."""
        n = 0
        for other in self.entries():
            if other.model_name == key.model_name and other != key:
                self.invalidate(other)
                n += 1
        return n

    def load_timing_cache(self, key: EngineKey | TimingCacheKey) -> bytes:
        p = self.timing_path(key)
        return p.read_bytes() if p.is_file() else b""

    def store_timing_cache(self, key: EngineKey | TimingCacheKey, data: bytes) -> None:
        atomic_write_bytes(self.timing_path(key), data)


def load_or_invalidate(cache: EngineCache, key: EngineKey, deserialize: Any) -> Any | None:
    """Deserialize the cached engine with ``deserialize(bytes)``; None means "build it".

    ``deserialize`` returning None (what ``IRuntime.deserialize_cuda_engine`` does on a version mismatch or a
    corrupt file) removes the entry so the rebuild replaces it.
    """
    blob = cache.load(key)
    if blob is None:
        return None
    engine = deserialize(blob)
    if engine is None:
        logger.warning("TensorRT could not deserialize %s; rebuilding", cache.engine_path(key).name)
        cache.invalidate(key)
        return None
    return engine
