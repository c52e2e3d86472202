"""Shared fixtures: isolated settings, offscreen Qt, and a check that no test leaves a thread running."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Qt must never need a display in the default suite; the Xvfb smoke test sets its own platform.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
PLUS_DATA = SHARED_DATA / "plus"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the settings folder at a temp dir and clear GUIDANCE_* variables: tests never read or write
    the user's real configuration."""
    cfg = tmp_path_factory.mktemp("config")
    for key in list(os.environ):
        if key.startswith("GUIDANCE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("GUIDANCE_CONFIG_DIR", str(cfg))


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves a thread of ours running (threads get 2 s to finish stopping)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leftover = [t for t in threading.enumerate() if t not in before and t.is_alive() and _ours(t)]
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leftover, f"test left threads running: {[t.name for t in leftover]}"


def _ours(t: threading.Thread) -> bool:
    # Threads started by libraries we do not own (Qt's pool, hypothesis, pydicom, onnxruntime's pool
    # is native) are not our responsibility; ours are all named with the "guidance-" prefix.
    return t.name.startswith("guidance-")
