"""Typed application settings with a schema version, loaded from a JSON file and the environment.

Precedence (lowest to highest): built-in defaults < settings file < environment variables < explicit
overrides passed by the CLI. Environment variables are ``GUIDANCE_<SECTION>__<FIELD>`` (for example
``GUIDANCE_STREAM__PORT=18944``). The settings file lives in :func:`config_dir` which honours
``GUIDANCE_CONFIG_DIR`` (the tests point it at a temporary folder so they never touch the user's file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENV_PREFIX = "GUIDANCE_"


class SettingsError(ValueError):
    """A settings file or variable could not be understood; the message says which and why."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Where frames come from."""

    host: str = "127.0.0.1"
    port: int = 18944
    device_filter: str = ""  # empty: accept every IMAGE device
    reconnect_initial_s: float = 0.25
    reconnect_max_s: float = 5.0
    max_body_mb: int = 64
    send_results: bool = False  # send label map (IMAGE) and tip (POINT/TRANSFORM) back to the peer


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Which segmentation engine runs and under what latency budget."""

    backend: str = "auto"
    model: str = ""  # empty: the shipped default model
    budget_ms: float = 0.0  # 0: one frame interval of the source
    synchronised: bool = False  # paint each frame only with its own result
    # Backends to step down to, in order, when the engine keeps missing the budget ("" disables).
    step_down: str = "classical"


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """The built-in simulated scanner."""

    modality: str = "us"
    fps: float = 30.0
    width: int = 256
    height: int = 256
    seed: int = 0
    # "demo": a clear teaching scene (needle aimed at the lesion, no distractors) drawn on the seed's
    # tissue; "random": everything sampled from the seed, as in training and evaluation.
    scene: str = "demo"


@dataclass(frozen=True, slots=True)
class UiSettings:
    theme: str = "dark"
    paint_hz: float = 60.0
    show_trajectory: bool = True
    recordings_dir: str = ""  # empty: ~/Guidance/recordings


def recordings_dir(settings: Settings) -> Path:
    """Where the app writes recordings (R key)."""
    return (
        Path(settings.ui.recordings_dir).expanduser()
        if settings.ui.recordings_dir
        else Path.home() / "Guidance" / "recordings"
    )


@dataclass(frozen=True, slots=True)
class Settings:
    schema_version: int = SCHEMA_VERSION
    stream: StreamSettings = field(default_factory=StreamSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    ui: UiSettings = field(default_factory=UiSettings)


def config_dir() -> Path:
    """Folder of the settings file: ``$GUIDANCE_CONFIG_DIR`` or the platform's user config folder."""
    env = os.environ.get("GUIDANCE_CONFIG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.environ.get("APPDATA") or str(Path.home() / ".config")
    return Path(base) / "guidance"


def settings_path() -> Path:
    return config_dir() / "settings.json"


T = TypeVar("T")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise SettingsError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float, str):
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    raise SettingsError(f"{where}: unsupported setting type {typ!r}")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        typ = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise SettingsError(f"{where}.{f.name}: expected a section, got {value!r}")
            kwargs[f.name] = _build(typ, value, f"{where}.{f.name}")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _coerce(value, typ, f"{where}.{f.name}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        logger.warning("Ignoring unknown settings in %s: %s", where, ", ".join(sorted(unknown)))
    return cls(**kwargs)


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX) :].lower().partition("__")
        out.setdefault(section, {})[name] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(
    path: Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Load settings: defaults < file < environment < ``overrides`` (nested dict by section)."""
    path = settings_path() if path is None else path
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SettingsError(f"settings file {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"settings file {path} must hold a JSON object")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise SettingsError(
                f"settings file {path} has schema version {version}; this build reads version {SCHEMA_VERSION}"
            )
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    data["schema_version"] = SCHEMA_VERSION
    return _build(Settings, data, "settings")


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write settings atomically (temp file + fsync + rename)."""
    path = settings_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".settings-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(settings_to_dict(settings), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace(settings: Settings, **sections: Any) -> Settings:
    """Return a copy with whole sections (or ``schema_version``) replaced."""
    return dataclasses.replace(settings, **sections)
