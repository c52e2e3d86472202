"""The main window: the live image dominant, a side panel of big readouts, a status bar in plain words.

Threading: everything here runs on the GUI thread. A paint timer (``settings.ui.paint_hz``) peeks the
session's newest frame and result and repaints only when one of them (or a display mode) changed; a slower
timer refreshes the numbers. Nothing here touches a socket or the engine. Errors from other threads reach
the window through :meth:`MainWindow.report_error`, which is safe to call from any thread (it emits a
queued signal).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from guidance.config import recordings_dir
from guidance.results import GuidanceResult
from streaming.frame import Frame
from streaming.recording import RecordingError
from ui import theme
from ui.image_view import ImageView, OverlayState, PaintPlan, plan_paint
from ui.session_api import SessionView, StatsView

logger = logging.getLogger(__name__)

#: How often the numbers in the side panel are refreshed (they are read, not watched).
STATS_HZ = 4.0

_CONNECTION_COLOURS = {
    "connected": theme.COLOURS.ok,
    "connecting": theme.COLOURS.warn,
    "reconnecting": theme.COLOURS.warn,
    "idle": theme.TEXT_DIM,
    "stopped": theme.TEXT_DIM,
}


def _wrappable_model(text: str) -> str:
    """``"name version"`` for a word-wrapped label: the name and the version's date-time never break
    (non-breaking hyphens), the rest of the version may after a hyphen or a ``+`` (zero-width spaces).

    A soup's version ("2026.12.06-0417-soup-s37+s38+s39") is wider than the side panel; with every hyphen
    non-breaking it was one word, and Qt clipped it.
    """
    name, _, version = text.partition(" ")
    parts = version.split("-")
    head = "\u2011".join(parts[:2])
    version = "-\u200b".join([head, *parts[2:]]).replace("+", "+\u200b") if version else ""
    return name.replace("-", "\u2011") + (f" {version}" if version else "")


def _fmt_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _card(caption: str) -> tuple[QFrame, QVBoxLayout]:
    card = QFrame()
    card.setObjectName("card")
    lay = QVBoxLayout(card)
    lay.setContentsMargins(16, 12, 16, 14)
    lay.setSpacing(4)
    cap = QLabel(caption.upper())
    cap.setObjectName("caption")
    lay.addWidget(cap)
    return card, lay


class _ErrorBridge(QObject):
    """Carries error messages from any thread to the GUI thread (queued signal)."""

    message = Signal(str)


class MainWindow(QMainWindow):
    """The guidance window around one session (passed in; no globals)."""

    framePainted = Signal(int)  # noqa: N815 - Qt signal naming; emits the seq of each newly painted frame
    closed = Signal()  # the window was closed and the session stopped

    def __init__(self, session: SessionView, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._markers = 0
        self.session = session
        self.setObjectName("mainWindow")
        self.setWindowTitle("Guidance")
        self.resize(1280, 800)
        self.painted_frames = 0
        self.stale_frames = 0  # frames painted with an overlay older than the budget (what the user saw)
        self.frozen = False
        self.synchronised = bool(session.synchronised)
        self._last_frame: Frame | None = None
        self._last_result: GuidanceResult | None = None
        self._last_mode: tuple[bool, bool] | None = None
        self._shown_result: GuidanceResult | None = None
        self._shown_state: OverlayState | None = None  # None: the readout was never drawn
        self._last_error_shown = ""
        self._closed = False

        self.view = ImageView()
        self.view.set_show_trajectory(session.settings.ui.show_trajectory)
        central = QWidget()
        central.setObjectName("central")
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        row.addWidget(self.view, 1)
        row.addWidget(self._build_panel())
        self.setCentralWidget(central)
        self._build_status_bar()
        self._build_shortcuts()

        self._errors = _ErrorBridge()
        self._errors.message.connect(self._show_error, Qt.ConnectionType.QueuedConnection)

        self.paint_timer = QTimer(self)
        self.paint_timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.paint_timer.setInterval(max(1, round(1000.0 / max(session.settings.ui.paint_hz, 1.0))))
        self.paint_timer.timeout.connect(self.paint_tick)
        self.stats_timer = QTimer(self)
        self.stats_timer.setInterval(round(1000.0 / STATS_HZ))
        self.stats_timer.timeout.connect(self.refresh_stats)
        self._update_mode_chips()
        self._update_readout(PaintPlan(None, None, OverlayState.NONE, 0.0))

    # ------------------------------------------------------------------ construction
    def _build_panel(self) -> QFrame:
        panel = QFrame()
        panel.setObjectName("sidePanel")
        panel.setFixedWidth(340)
        col = QVBoxLayout(panel)
        col.setContentsMargins(16, 16, 16, 12)
        col.setSpacing(12)

        card, lay = _card("Tip to target")
        numeral_row = QHBoxLayout()
        numeral_row.setSpacing(8)
        self.distance_label = QLabel("–")
        self.distance_label.setObjectName("distance")
        self.distance_label.setFont(theme.big_numeral_font())
        self.distance_label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBaseline)
        unit = QLabel("mm")
        unit.setObjectName("distanceUnit")
        numeral_row.addWidget(self.distance_label)
        numeral_row.addWidget(unit, 0, Qt.AlignmentFlag.AlignBottom)
        numeral_row.addStretch(1)
        lay.addLayout(numeral_row)
        self.path_label = QLabel("WAITING FOR AI")
        self.path_label.setObjectName("pathState")
        lay.addWidget(self.path_label)
        self.detail_label = QLabel(" ")
        self.detail_label.setObjectName("detail")
        self.detail_label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.detail_label.ensurePolished()
        # Room for the three detail lines up front: the card never re-flows while the numbers change.
        self.detail_label.setFixedHeight(3 * self.detail_label.fontMetrics().lineSpacing() + 4)
        lay.addWidget(self.detail_label)
        col.addWidget(card)

        chips = QHBoxLayout()
        chips.setSpacing(6)
        self.chip_sync = self._chip("SYNC", "Synchronised: each frame only with its own result (S)")
        self.chip_traj = self._chip("PATH", "Projected trajectory shown (T)")
        self.chip_frozen = self._chip("FROZEN", "Display frozen (Space)")
        self.chip_rec = self._chip("● REC", "Recording the live stream (R to stop, M for a marker)")
        self.chip_rec.setObjectName("recChip")
        for chip in (self.chip_sync, self.chip_traj, self.chip_frozen, self.chip_rec):
            chips.addWidget(chip)
        chips.addStretch(1)
        col.addLayout(chips)

        card, lay = _card("Pipeline")
        grid = QGridLayout()
        grid.setHorizontalSpacing(12)
        grid.setVerticalSpacing(5)
        self.metric_labels: dict[str, QLabel] = {}
        rows = (
            ("input_fps", "Input"),
            ("processed_fps", "AI"),
            ("skipped", "Skipped frames"),
            ("stale", "Stale frames"),
            ("latency_last", "Receive → result"),
            ("latency_pct", "  p50 / p99"),
            ("queue", "  queue"),
            ("infer", "  inference"),
            ("interpret", "  interpretation"),
            ("budget", "Budget"),
        )
        for i, (key, name) in enumerate(rows):
            n = QLabel(name)
            n.setObjectName("metricName")
            v = QLabel("–")
            v.setObjectName("metricValue")
            v.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            grid.addWidget(n, i, 0)
            grid.addWidget(v, i, 1)
            self.metric_labels[key] = v
        lay.addLayout(grid)
        col.addWidget(card)

        card, lay = _card("Engine")
        self.engine_label = QLabel("–")
        self.engine_label.setObjectName("detail")
        self.engine_label.setWordWrap(True)
        lay.addWidget(self.engine_label)
        col.addWidget(card)

        col.addStretch(1)
        hint = QLabel("F11 full screen · S sync · T path · Space freeze\nR record · M marker · Ctrl+Q quit")
        hint.setObjectName("detail")
        hint.setWordWrap(True)
        hint.setStyleSheet(f"color: {theme.TEXT_DIM}; font-size: 9pt;")
        col.addWidget(hint)
        return panel

    def _chip(self, text: str, tip: str) -> QLabel:
        chip = QLabel(text)
        chip.setObjectName("modeChip")
        chip.setToolTip(tip)
        return chip

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        bar.setSizeGripEnabled(False)
        self.connection_label = QLabel("● idle")
        self.source_label = QLabel("")
        self.error_label = QLabel("")
        self.error_label.setObjectName("statusError")
        self.error_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        bar.addWidget(self.connection_label)
        bar.addWidget(self.source_label)
        bar.addWidget(self.error_label, 1)

    def _build_shortcuts(self) -> None:
        bindings = (
            (QKeySequence(Qt.Key.Key_F11), self.toggle_fullscreen),
            (QKeySequence(Qt.Key.Key_S), self.toggle_synchronised),
            (QKeySequence(Qt.Key.Key_T), self.toggle_trajectory),
            (QKeySequence(Qt.Key.Key_Space), self.toggle_frozen),
            (QKeySequence("Ctrl+Q"), self.close),
            (QKeySequence(Qt.Key.Key_R), self.start_recording),
            (QKeySequence(Qt.Key.Key_M), self.add_marker),
        )
        self.shortcuts: list[QShortcut] = []
        for seq, slot in bindings:
            sc = QShortcut(seq, self)
            sc.setContext(Qt.ShortcutContext.ApplicationShortcut)
            sc.activated.connect(slot)
            self.shortcuts.append(sc)

    # ------------------------------------------------------------------ lifecycle
    def start_timers(self) -> None:
        self.paint_timer.start()
        self.stats_timer.start()
        self.refresh_stats()

    def stop_timers(self) -> None:
        self.paint_timer.stop()
        self.stats_timer.stop()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the timers and the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.stop_timers()
        self.session.stop()
        self.closed.emit()

    # ------------------------------------------------------------------ painting (GUI thread)
    def paint_tick(self) -> bool:
        """Pull the newest frame/result and repaint if anything changed. Returns True when it painted."""
        if self.frozen:
            return False
        # Result first, then frame: the frame we get is never older than the result's frame.
        result = self.session.latest_result()
        frame = self.session.latest_frame()
        mode = (self.synchronised, self.view.show_trajectory)
        if frame is self._last_frame and result is self._last_result and mode == self._last_mode:
            return False
        self._last_frame, self._last_result, self._last_mode = frame, result, mode
        budget = result.budget_ms if result is not None else 0.0
        plan = plan_paint(frame, result, synchronised=self.synchronised, budget_ms=budget)
        self.paint_plan(plan)
        return True

    def paint_plan(self, plan: PaintPlan) -> None:
        previous_seq, previous_overlay = self.view.painted_seq, self.view.overlay_seq
        previous_frame = self.view.painted_frame
        self.view.show_plan(plan)
        if plan.result is not self._shown_result or plan.state is not self._shown_state:
            self._shown_result, self._shown_state = plan.result, plan.state
            self._update_readout(plan)
        if plan.frame is None:
            return
        now = time.perf_counter_ns()
        new_frame = plan.frame is not previous_frame
        own_result_arrived = (
            plan.result is not None
            and plan.result.seq == plan.frame.seq
            and previous_overlay != plan.frame.seq
        )
        stale = new_frame and plan.state is OverlayState.STALE
        if new_frame or own_result_arrived:
            self.session.mark_painted(plan.frame.seq, now, stale=stale)
        if new_frame:
            self.painted_frames += 1
            self.stale_frames += stale
            if previous_seq is None:
                logger.info("First frame painted: %dx%d", plan.frame.width, plan.frame.height)
            self.framePainted.emit(plan.frame.seq)

    def _update_readout(self, plan: PaintPlan) -> None:
        c = theme.COLOURS
        result = plan.result
        if result is None:
            self.distance_label.setText("–")
            self._set_colour(self.distance_label, theme.TEXT_DIM)
            self.path_label.setText("WAITING FOR AI" if not self.synchronised else "SYNC: WAITING")
            self._set_colour(self.path_label, theme.TEXT_DIM)
            self.detail_label.setText(" ")
            return
        interp = result.interpretation
        stale = plan.state is OverlayState.STALE
        mm = interp.tip_to_target_mm
        self.distance_label.setText("–" if mm is None else f"{mm:.1f}")
        self._set_colour(self.distance_label, c.stale if stale or mm is None else theme.TEXT)
        needle = interp.instrument
        if needle is None:
            state, colour = "NO INSTRUMENT", theme.TEXT_DIM
        elif interp.target is None:
            state, colour = "NO TARGET", theme.TEXT_DIM
        elif interp.on_path is True:
            state, colour = "● ON PATH", c.ok
        elif interp.on_path is False:
            state, colour = "▲ OFF PATH", c.warn
        else:
            state, colour = interp.status.upper(), theme.TEXT_DIM
        if stale:
            state, colour = f"{state} · STALE", c.stale
        self.path_label.setText(state)
        self._set_colour(self.path_label, colour)
        details = []
        if needle is not None:
            low = " (low)" if interp.status == "low confidence" else ""
            details.append(f"Confidence {needle.confidence * 100:.0f} %{low}")
        if interp.tip_to_boundary_mm is not None:
            inside = " (inside)" if interp.tip_to_boundary_mm < 0 else ""
            details.append(f"Target edge {abs(interp.tip_to_boundary_mm):.1f} mm{inside}")
        if plan.state is not OverlayState.CURRENT:
            details.append(f"Overlay {plan.age_ms:.0f} ms old")
        self.detail_label.setText("\n".join(details) or " ")

    @staticmethod
    def _set_colour(label: QLabel, colour: str) -> None:
        if label.property("colour") != colour:
            label.setProperty("colour", colour)
            label.setStyleSheet(f"color: {colour};")

    # ------------------------------------------------------------------ numbers (GUI thread, slower)
    def refresh_stats(self) -> None:
        try:
            stats = self.session.stats()
        except Exception as exc:
            logger.exception("Session stats failed")
            self._show_error(f"Statistics unavailable: {exc}")
            return
        self.apply_stats(stats)

    def apply_stats(self, stats: StatsView) -> None:
        m = self.metric_labels
        m["input_fps"].setText(f"{stats.input_fps:.1f} fps")
        m["processed_fps"].setText(f"{stats.processed_fps:.1f} fps")
        m["skipped"].setText(f"{stats.frames_skipped:,}")
        m["stale"].setText(f"{self.stale_frames:,}")
        last: Mapping[str, float] = stats.last_ms
        m["latency_last"].setText(f"{_fmt_ms(last.get('receive_to_result'))} ms")
        r2r = stats.latency.get("receive_to_result", {})
        m["latency_pct"].setText(f"{_fmt_ms(r2r.get('p50'))} / {_fmt_ms(r2r.get('p99'))} ms")
        for key in ("queue", "infer", "interpret"):
            m[key].setText(f"{_fmt_ms(last.get(key))} ms")
        m["budget"].setText(f"{_fmt_ms(stats.budget_ms)} ms")
        note = stats.engine_note
        model = _wrappable_model(stats.engine_model)
        self.engine_label.setText(
            (stats.engine_label or "–") + (f"\n{model}" if model else "") + (f"\n{note}" if note else "")
        )
        state = stats.connection or "idle"
        colour = _CONNECTION_COLOURS.get(state, theme.COLOURS.error)
        self.connection_label.setText(f"● {state}")
        self.connection_label.setStyleSheet(f"color: {colour};")
        self.source_label.setText(stats.source)
        if self.view.painted_frame is None:
            waiting = "Waiting for images…" if state in ("connected", "idle") else f"No images · {state}"
            self.view.set_banner(waiting)
        if stats.last_error and stats.last_error != self._last_error_shown:
            self._show_error(stats.last_error)

    # ------------------------------------------------------------------ errors (any thread -> GUI)
    def report_error(self, message: str) -> None:
        """Show ``message`` in the status bar. Safe to call from any thread."""
        self._errors.message.emit(message)

    def _show_error(self, message: str) -> None:
        self._last_error_shown = message
        first_line = message.strip().splitlines()[0] if message.strip() else message
        self.error_label.setText(f"{time.strftime('%H:%M:%S')}  {first_line}")
        self.error_label.setToolTip(message)

    @property
    def closed_flag(self) -> bool:
        """True once the window has shut down (the session is stopped)."""
        return self._closed

    @property
    def error_text(self) -> str:
        return self.error_label.text()

    # ------------------------------------------------------------------ shortcuts
    def toggle_fullscreen(self) -> None:
        if self.isFullScreen():
            self.showNormal()
        else:
            self.showFullScreen()

    def toggle_synchronised(self) -> None:
        self.synchronised = not self.synchronised
        self.session.synchronised = self.synchronised
        self._update_mode_chips()
        self.statusBar().showMessage(
            "Synchronised: each frame with its own result"
            if self.synchronised
            else "Live: newest frame at once",
            3000,
        )

    def toggle_trajectory(self) -> None:
        self.view.set_show_trajectory(not self.view.show_trajectory)
        self._update_mode_chips()

    def toggle_frozen(self) -> None:
        self.frozen = not self.frozen
        self.view.set_frozen(self.frozen)
        self._update_mode_chips()
        if not self.frozen:
            self._last_frame = self._last_result = None  # repaint at once on unfreeze

    def start_recording(self) -> None:
        """R: start recording the live stream, or stop the running recording."""
        if self.session.recording_path is not None:
            path = self.session.recording_path
            stats = self.session.stop_recording()
            lost = f", {stats.dropped} dropped" if stats is not None and stats.dropped else ""
            saved = f"{stats.written:,} messages{lost}" if stats is not None else "saved"
            self.statusBar().showMessage(f"Recording saved: {path} ({saved})", 8000)
        else:
            folder = recordings_dir(self.session.settings)
            path = folder / time.strftime("session-%Y%m%d-%H%M%S.mcap")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.session.start_recording(path)
            except (OSError, RecordingError, RuntimeError) as exc:
                self.report_error(f"Could not start recording: {exc}")
                return
            self._markers = 0
            self.statusBar().showMessage(f"Recording to {path}  (R stops, M adds a marker)", 8000)
        self._update_mode_chips()

    def add_marker(self) -> None:
        """M: drop a numbered marker into the running recording."""
        self._markers += 1
        if self.session.add_marker(f"marker {self._markers}"):
            self.statusBar().showMessage(f"Marker {self._markers} added", 3000)
        else:
            self._markers -= 1
            self.statusBar().showMessage(
                "Not recording: press R to start a recording, then M for markers.", 4000
            )

    def _update_mode_chips(self) -> None:
        for chip, active in (
            (self.chip_sync, self.synchronised),
            (self.chip_traj, self.view.show_trajectory),
            (self.chip_frozen, self.frozen),
            (self.chip_rec, self.session.recording_path is not None),
        ):
            value = "true" if active else "false"
            if chip.property("active") != value:
                chip.setProperty("active", value)
                chip.style().unpolish(chip)
                chip.style().polish(chip)
