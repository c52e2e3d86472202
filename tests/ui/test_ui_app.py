"""run_app (the registered front end) and the error hooks, on a scripted session and on the real one."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from guidance.frontend import FrontendOptions
from ui.app import _ErrorHooks, run_app
from ui.main_window import MainWindow

sys.path.insert(0, str(Path(__file__).parent))  # import-mode=importlib: shared helpers beside us
from test_ui_support import ScriptedSession, make_frame, make_result

pytestmark = [pytest.mark.gui, pytest.mark.qt_log_ignore("propagateSizeHints")]


def _main_windows() -> list[MainWindow]:
    return [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow)]


def test_ui_run_app_quits_after_frames_and_saves_screenshot(qtbot: QtBot, tmp_path: Path) -> None:
    session = ScriptedSession()
    session.frame = make_frame(7)
    session.result = make_result(session.frame)
    shot = tmp_path / "shots" / "window.png"
    hooks_before = (sys.excepthook, threading.excepthook)
    code = run_app(session, FrontendOptions(frames=1, screenshot=shot, title="Guidance test"))
    assert code == 0
    assert session.started == 1
    assert session.stopped == 1
    assert session.painted == [7]
    image = QImage(str(shot))
    assert not image.isNull()
    assert image.width() >= 800
    assert not _main_windows()
    assert (sys.excepthook, threading.excepthook) == hooks_before


def test_ui_run_app_stops_session_when_start_fails(qtbot: QtBot) -> None:
    class Broken(ScriptedSession):
        def start(self) -> None:
            raise RuntimeError("engine backend 'tensorrt' is not available: no GPU")

    session = Broken()
    with pytest.raises(RuntimeError, match="no GPU"):
        run_app(session, FrontendOptions(frames=1))
    assert session.stopped == 1
    assert not _main_windows()


def test_ui_thread_errors_reach_status_bar(qtbot: QtBot) -> None:
    session = ScriptedSession()
    window = MainWindow(session)
    qtbot.addWidget(window)
    before = threading.excepthook
    hooks = _ErrorHooks(window)
    hooks.install()
    try:

        def boom() -> None:
            raise RuntimeError("decoder lost sync")

        t = threading.Thread(target=boom, name="guidance-test-boom")
        t.start()
        t.join(2)
        qtbot.waitUntil(lambda: "decoder lost sync" in window.error_text)
        assert "guidance-test-boom" in window.error_text
        # GUI-thread errors (an exception escaping a slot) go through sys.excepthook.
        err = ValueError("bad overlay geometry")
        sys.excepthook(ValueError, err, None)
        qtbot.waitUntil(lambda: "bad overlay geometry" in window.error_text)
    finally:
        hooks.uninstall()
    assert threading.excepthook is before
    window.close()
