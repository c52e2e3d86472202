"""Main window and image view around a scripted session (exact frames/results chosen by the test)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from ui import theme
from ui.image_view import OverlayState, clip_segment_end, contours_to_path, plan_paint
from ui.main_window import MainWindow

sys.path.insert(0, str(Path(__file__).parent))  # import-mode=importlib: shared helpers beside us
from test_ui_support import (
    ENTRY,
    TARGET_CENTRE,
    TIP,
    ScriptedSession,
    close_colour,
    make_frame,
    make_result,
    window_pixel,
)

pytestmark = [pytest.mark.gui, pytest.mark.qt_log_ignore("propagateSizeHints")]


@pytest.fixture
def session() -> ScriptedSession:
    return ScriptedSession()


@pytest.fixture
def window(qtbot: QtBot, session: ScriptedSession) -> MainWindow:
    app = QApplication.instance()
    assert isinstance(app, QApplication)
    theme.apply_theme(app)
    w = MainWindow(session)
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    qtbot.waitExposed(w)
    return w


# ---------------------------------------------------------------------------- pure paint planning
def test_ui_plan_current_lagging_stale() -> None:
    f0 = make_frame(0, receive_ns=1_000_000_000)
    r0 = make_result(f0, budget_ms=33.3)
    assert plan_paint(f0, r0, synchronised=False, budget_ms=33.3).state is OverlayState.CURRENT
    f1 = make_frame(1, receive_ns=f0.receive_ns + 20_000_000)
    lag = plan_paint(f1, r0, synchronised=False, budget_ms=33.3)
    assert lag.state is OverlayState.LAGGING
    assert lag.frame is f1
    assert lag.age_ms == pytest.approx(20.0)
    f5 = make_frame(5, receive_ns=f0.receive_ns + 143_000_000)
    stale = plan_paint(f5, r0, synchronised=False, budget_ms=33.3)
    assert stale.state is OverlayState.STALE
    assert stale.age_ms == pytest.approx(143.0)
    assert plan_paint(f5, None, synchronised=False, budget_ms=33.3).state is OverlayState.NONE


def test_ui_plan_synchronised_paints_the_results_own_frame() -> None:
    f0 = make_frame(0, receive_ns=1_000_000_000)
    f5 = make_frame(5, receive_ns=f0.receive_ns + 143_000_000)
    plan = plan_paint(f5, make_result(f0), synchronised=True, budget_ms=33.3)
    assert plan.frame is f0
    assert plan.state is OverlayState.CURRENT
    first = plan_paint(f5, None, synchronised=True, budget_ms=33.3)
    assert first.frame is f5
    assert first.result is None


def test_ui_contours_joined_closed_with_nan_breaks() -> None:
    a = np.array([[0, 0], [1, 0], [1, 1]], np.float32)
    b = np.array([[5, 5], [6, 5]], np.float32)
    path = contours_to_path((a, b))
    assert path.shape == (4 + 1 + 3, 2)
    assert np.array_equal(path[3], a[0])
    assert np.isnan(path[4]).all()
    assert np.array_equal(path[-1], b[0])
    assert contours_to_path(()).shape == (0, 2)


def test_ui_trajectory_clipped_to_image() -> None:
    assert clip_segment_end((10, 10), (400, 10), 256, 128) == pytest.approx((255.5, 10))
    assert clip_segment_end((10, 10), (10, -50), 256, 128) == pytest.approx((10, -0.5))
    assert clip_segment_end((100, 64), (500, 264), 256, 128) == pytest.approx((227.0, 127.5))
    assert clip_segment_end((10, 10), (20, 20), 256, 128) == pytest.approx((20, 20))


# ---------------------------------------------------------------------------- window
def test_ui_overlay_items_hold_result_geometry(window: MainWindow, session: ScriptedSession) -> None:
    frame = make_frame(3)
    result = make_result(frame)
    session.frame, session.result = frame, result
    assert window.paint_tick()
    assert not window.paint_tick()  # nothing changed: no repaint
    v = window.view
    assert v.painted_seq == 3
    assert v.overlay_seq == 3
    assert v.state is OverlayState.CURRENT
    assert session.painted == [3]
    x, y = v.instrument_curve.getData()
    shaft = result.interpretation.instrument_contours[0]
    np.testing.assert_allclose(np.stack([x, y], 1)[: len(shaft)], shaft)
    tx, _ty = v.target_curve.getData()
    np.testing.assert_allclose(
        tx[: len(result.interpretation.target_contours[0])], result.interpretation.target_contours[0][:, 0]
    )
    tip = v.tip_marker.getData()
    assert (tip[0][0], tip[1][0]) == pytest.approx(TIP)
    cx, cy = v.centroid_marker.getData()
    assert (cx[0], cy[0]) == pytest.approx(TARGET_CENTRE)
    lx, ly = v.centerline_curve.getData()
    assert (lx[0], ly[0]) == pytest.approx(ENTRY)
    jx, jy = v.trajectory_curve.getData()
    assert (jx[-1], jy[-1]) == pytest.approx((255.0, 187.0))
    assert v.overlay.isVisible()
    assert not v.badge.isVisible()
    assert window.distance_label.text() == "21.4"
    assert "ON PATH" in window.path_label.text()
    # The tip marker is really drawn where the tip is: the grabbed window is tip-yellow there.
    assert close_colour(window_pixel(window, *TIP), theme.COLOURS.tip), window_pixel(window, *TIP).name()


def test_ui_stale_overlay_greyed_with_badge(window: MainWindow, session: ScriptedSession) -> None:
    old = make_frame(0)
    session.result = make_result(old, budget_ms=33.3)
    session.frame = make_frame(5, receive_ns=old.receive_ns + 143_000_000)
    window.paint_tick()
    v = window.view
    assert v.state is OverlayState.STALE
    assert v.badge.isVisible()
    assert v.badge.text() == "STALE 143 ms"
    assert v.instrument_curve.opts["pen"].style() == Qt.PenStyle.DashLine
    assert v.instrument_curve.opts["pen"].color().name() == theme.COLOURS.stale
    assert "STALE" in window.path_label.text()
    assert close_colour(window_pixel(window, *TIP), theme.COLOURS.stale)
    assert window.stale_frames == 1
    window.refresh_stats()
    assert window.metric_labels["stale"].text() == "1"
    # The AI catches up: the overlay is current again and the badge goes.
    session.result = make_result(session.frame)
    window.paint_tick()
    assert v.state is OverlayState.CURRENT
    assert not v.badge.isVisible()
    assert v.instrument_curve.opts["pen"].color().name() == theme.COLOURS.instrument


def test_ui_lagging_overlay_shows_age(window: MainWindow, session: ScriptedSession) -> None:
    old = make_frame(0)
    session.result = make_result(old, budget_ms=33.3)
    session.frame = make_frame(1, receive_ns=old.receive_ns + 20_000_000)
    window.paint_tick()
    assert window.view.state is OverlayState.LAGGING
    assert window.view.badge.text() == "AI 20 ms behind"
    assert "Overlay 20 ms old" in window.detail_label.text()


def test_ui_no_instrument_readout(window: MainWindow, session: ScriptedSession) -> None:
    session.frame = make_frame(1)
    session.result = make_result(session.frame, with_instrument=False)
    window.paint_tick()
    assert window.path_label.text() == "NO INSTRUMENT"
    assert window.distance_label.text() == "–"
    assert not window.view.tip_marker.getData()[0].size


def test_ui_uint16_frames_use_fixed_levels(window: MainWindow, session: ScriptedSession) -> None:
    session.frame = make_frame(1, dtype=np.uint16)
    window.paint_tick()
    lo, hi = window.view.levels
    assert 0 <= lo < hi <= 65535
    assert hi > 255
    session.frame = make_frame(2, dtype=np.uint16)
    window.paint_tick()
    assert window.view.levels == (lo, hi)  # not re-levelled per frame (no flicker)
    assert window.view.image.image is not None
    assert window.view.image.image.dtype == np.uint16


def test_ui_shortcuts_toggle_state(window: MainWindow, session: ScriptedSession, qtbot: QtBot) -> None:
    session.frame = make_frame(1)
    session.result = make_result(session.frame)
    window.paint_tick()
    window.activateWindow()
    qtbot.keyClick(window, Qt.Key.Key_S)
    assert window.synchronised
    assert session.synchronised
    assert window.chip_sync.property("active") == "true"
    qtbot.keyClick(window, Qt.Key.Key_T)
    assert not window.view.show_trajectory
    assert not window.view.trajectory_curve.isVisible()
    qtbot.keyClick(window, Qt.Key.Key_Space)
    assert window.frozen
    assert window.view.badge.text().startswith("FROZEN")
    session.frame = make_frame(2)
    assert not window.paint_tick()  # frozen: the picture holds
    assert window.view.painted_seq == 1
    qtbot.keyClick(window, Qt.Key.Key_Space)
    assert not window.frozen
    assert window.paint_tick()
    qtbot.keyClick(window, Qt.Key.Key_F11)
    assert window.isFullScreen()
    qtbot.keyClick(window, Qt.Key.Key_F11)
    assert not window.isFullScreen()
    qtbot.keyClick(window, Qt.Key.Key_M)
    assert "Not recording" in window.statusBar().currentMessage()
    qtbot.keyClick(window, Qt.Key.Key_R)  # the scripted session cannot record: a plain-words error
    qtbot.waitUntil(lambda: "Could not start recording" in window.error_label.text())
    assert window.chip_rec.property("active") != "true"
    qtbot.keyClick(window, Qt.Key.Key_Q, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: not window.isVisible())
    assert window.closed_flag
    assert session.stopped == 1


def test_ui_synchronised_paints_results_frame(window: MainWindow, session: ScriptedSession) -> None:
    old = make_frame(0)
    session.result = make_result(old)
    session.frame = make_frame(5, receive_ns=old.receive_ns + 143_000_000)
    window.toggle_synchronised()
    window.paint_tick()
    assert window.view.painted_seq == 0
    assert window.view.state is OverlayState.CURRENT
    assert not window.view.badge.isVisible()


def test_ui_stats_panel_and_errors(window: MainWindow, session: ScriptedSession, qtbot: QtBot) -> None:
    session.fake_stats.last_error = "Connection to 10.0.0.5:18944 refused; retrying in 2 s"
    window.refresh_stats()
    assert window.metric_labels["input_fps"].text() == "30.0 fps"
    assert window.metric_labels["skipped"].text() == "2"
    assert window.metric_labels["latency_pct"].text() == "7.4 / 12.9 ms"
    assert window.metric_labels["infer"].text() == "5.0 ms"
    assert "refused" in window.error_text
    # From another thread: the message is carried to the GUI thread by a queued signal.
    t = threading.Thread(
        target=window.report_error, args=("engine crashed: out of memory",), name="guidance-test"
    )
    t.start()
    t.join(2)
    qtbot.waitUntil(lambda: "out of memory" in window.error_text)


def test_ui_close_stops_session_once(window: MainWindow, session: ScriptedSession) -> None:
    window.start_timers()
    window.close()
    window.close()
    assert session.stopped == 1
    assert not window.paint_timer.isActive()


def test_model_name_wraps_after_the_date_time_never_inside_it() -> None:
    from ui.main_window import _wrappable_model

    text = "guidance-unet 2026.12.06-0417-soup-s37+s38+s39"
    shown = _wrappable_model(text)
    assert shown.replace("\u2011", "-").replace("\u200b", "") == text  # the same characters on screen
    name, version = shown.split(" ")
    assert "-" not in name  # the name never breaks
    assert "\u200b" not in name
    assert version.startswith("2026.12.06\u20110417-\u200b")  # nor the date-time; the rest may
    assert version.count("\u200b") == 4
    assert _wrappable_model("") == ""
