"""The window around the real LiveSession on the built-in simulator (classical engine, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from guidance.config import EngineSettings, Settings, SimulatorSettings
from guidance.frontend import FrontendOptions
from guidance.session import LiveSession
from ui import theme
from ui.app import run_app
from ui.image_view import OverlayState
from ui.main_window import MainWindow

sys.path.insert(0, str(Path(__file__).parent))  # import-mode=importlib: shared helpers beside us
from test_ui_support import close_colour, window_pixel

pytestmark = [pytest.mark.gui, pytest.mark.qt_log_ignore("propagateSizeHints")]


def _settings() -> Settings:
    return Settings(
        engine=EngineSettings(backend="classical"),
        simulator=SimulatorSettings(fps=30.0, width=256, height=256, seed=3),
    )


def test_ui_live_session_overlay_matches_result(qtbot: QtBot) -> None:
    app = QApplication.instance()
    assert isinstance(app, QApplication)
    theme.apply_theme(app)
    session = LiveSession(_settings(), simulate=True)
    window = MainWindow(session)
    qtbot.addWidget(window)
    window.resize(1280, 800)
    window.show()
    session.start()
    window.start_timers()
    try:

        def painted_with_needle() -> bool:
            r = session.latest_result()
            return (
                window.view.overlay_seq is not None
                and r is not None
                and r.interpretation.instrument is not None
                and window.view.overlay_seq == r.seq
            )

        qtbot.waitUntil(painted_with_needle, timeout=15_000)
        # Hold still: stop painting and the pipeline, then repaint from the final slot contents.
        window.stop_timers()
        session.stop()
        window._last_result = None
        window.paint_tick()
        shown = session.latest_result()
        assert shown is not None
        v = window.view
        assert v.overlay_seq == shown.seq
        interp = shown.interpretation
        x, y = v.instrument_curve.getData()
        if interp.instrument_contours:
            first = interp.instrument_contours[0]
            np.testing.assert_allclose(np.stack([x, y], 1)[: len(first)], first)
        if interp.instrument is not None:
            tip = v.tip_marker.getData()
            assert (tip[0][0], tip[1][0]) == pytest.approx(interp.instrument.tip_px)
            colour = theme.COLOURS.stale if v.state is OverlayState.STALE else theme.COLOURS.tip
            assert close_colour(window_pixel(window, *interp.instrument.tip_px), colour)
        else:
            assert v.tip_marker.getData()[0].size == 0
        window.refresh_stats()
        assert window.metric_labels["input_fps"].text().endswith("fps")
        assert window.engine_label.text() != "–"
        model = session.stats().engine_model
        assert model
        shown_model = window.engine_label.text().replace("\u2011", "-").replace("\u200b", "")
        assert model in shown_model  # which model draws the overlay is on screen
        assert window.painted_frames > 0
    finally:
        window.close()
    assert window.closed_flag


def test_ui_run_app_on_live_session(qtbot: QtBot, tmp_path: Path) -> None:
    session = LiveSession(_settings(), simulate=True)
    shot = tmp_path / "live.png"
    assert run_app(session, FrontendOptions(frames=15, screenshot=shot)) == 0
    assert not QImage(str(shot)).isNull()
    assert session.stats().frames_received >= 15
    assert not [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow)]


def test_ui_record_and_marker_keys_write_a_recording(qtbot: QtBot, tmp_path: Path) -> None:
    """R starts a real recording of the live stream, M drops markers, R again stops and saves it."""
    import dataclasses

    from streaming.recording import RecordingReader

    settings = _settings()
    settings = dataclasses.replace(
        settings, ui=dataclasses.replace(settings.ui, recordings_dir=str(tmp_path))
    )
    session = LiveSession(settings, simulate=True)
    window = MainWindow(session)
    qtbot.addWidget(window)
    window.show()
    session.start()
    window.start_timers()
    try:
        qtbot.waitUntil(lambda: session.latest_frame() is not None, timeout=10_000)
        window.activateWindow()
        qtbot.keyClick(window, Qt.Key.Key_R)
        assert session.recording_path is not None
        assert window.chip_rec.property("active") == "true"
        qtbot.keyClick(window, Qt.Key.Key_M)
        assert "Marker 1 added" in window.statusBar().currentMessage()
        start = session.stats().frames_received
        qtbot.waitUntil(lambda: session.stats().frames_received >= start + 10, timeout=10_000)
        qtbot.keyClick(window, Qt.Key.Key_R)
        assert session.recording_path is None
        assert "Recording saved" in window.statusBar().currentMessage()
    finally:
        window.stop_timers()
        session.stop()
    files = list(tmp_path.glob("session-*.mcap"))
    assert len(files) == 1
    rec = RecordingReader(files[0]).open()
    assert [m.label for m in rec.markers] == ["marker 1"]
    assert sum(1 for _ in rec.frames()) >= 10
