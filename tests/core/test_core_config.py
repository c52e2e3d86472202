from __future__ import annotations

import json
from pathlib import Path

import pytest

from guidance.config import (
    SCHEMA_VERSION,
    Settings,
    SettingsError,
    load_settings,
    save_settings,
    settings_path,
)


def test_defaults_and_isolation(tmp_path: Path) -> None:
    s = load_settings()
    assert s == Settings()
    # the autouse fixture points the config folder away from the user's home
    assert "guidance" not in str(settings_path().parent.parent) or str(tmp_path.parent) in str(
        settings_path()
    )


def test_file_then_env_then_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    save_settings(Settings())
    data = json.loads(settings_path().read_text())
    data["stream"]["port"] = 20000
    data["engine"]["backend"] = "classical"
    settings_path().write_text(json.dumps(data))
    monkeypatch.setenv("GUIDANCE_STREAM__PORT", "21000")
    monkeypatch.setenv("GUIDANCE_ENGINE__SYNCHRONISED", "yes")
    s = load_settings(overrides={"simulator": {"fps": 15}})
    assert s.stream.port == 21000  # env beats file
    assert s.engine.backend == "classical"  # file beats default
    assert s.engine.synchronised is True
    assert s.simulator.fps == 15.0


def test_bad_values_are_reported_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUIDANCE_STREAM__PORT", "eighteen")
    with pytest.raises(SettingsError, match=r"settings\.stream\.port: expected int"):
        load_settings()


def test_schema_version_mismatch_and_garbage() -> None:
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SettingsError, match="schema version"):
        load_settings()
    path.write_text("{not json")
    with pytest.raises(SettingsError, match="unreadable"):
        load_settings()
