"""The Qt front end's entry point, registered as ``guidance.frontends: qt = ui.app:run_app``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from PySide6.QtCore import (
    QCoreApplication,
    QEvent,
    QEventLoop,
    QMessageLogContext,
    QTimer,
    QtMsgType,
    qInstallMessageHandler,
)
from PySide6.QtWidgets import QApplication

from guidance.logs import install_thread_excepthook
from ui.main_window import MainWindow
from ui.session_api import SessionView
from ui.theme import apply_theme

if TYPE_CHECKING:
    from guidance.frontend import FrontendOptions

logger = logging.getLogger(__name__)

#: With ``options.frames`` set, give up (exit code 1) when no frame has been painted for this long.
NO_FRAMES_TIMEOUT_S = 30.0


def ensure_application() -> QApplication:
    """Return the running QApplication, creating one when there is none."""
    app = QCoreApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
        app.setApplicationName("Guidance")
        app.setOrganizationName("Guidance")
    if not isinstance(app, QApplication):
        raise RuntimeError("a non-GUI QCoreApplication is already running; the window needs a QApplication")
    return app


#: Qt messages that carry no information for this app (the offscreen platform used for screenshots and CI
#: cannot resize a window to its size hints and says so on every layout change).
_QT_NOISE = ("This plugin does not support propagateSizeHints()",)

_QT_LEVELS = {
    QtMsgType.QtDebugMsg: logging.DEBUG,
    QtMsgType.QtInfoMsg: logging.INFO,
    QtMsgType.QtWarningMsg: logging.WARNING,
    QtMsgType.QtCriticalMsg: logging.ERROR,
    QtMsgType.QtFatalMsg: logging.CRITICAL,
}
_qt_logger = logging.getLogger("ui.qt")


class _QtMessages:
    """Qt's own messages: known noise goes to DEBUG; the rest to the handler that was there before (e.g.
    pytest-qt's, which fails tests on warnings) or, when there was none, to Python logging."""

    def __init__(self) -> None:
        self.previous: Callable[[QtMsgType, QMessageLogContext, str], object] | None = None

    def __call__(self, mode: QtMsgType, context: QMessageLogContext, message: str) -> None:
        if message in _QT_NOISE:
            _qt_logger.debug("%s", message)
        elif self.previous is not None:
            self.previous(mode, context, message)
        else:
            _qt_logger.log(_QT_LEVELS.get(mode, logging.WARNING), "%s", message)


class _ErrorHooks:
    """Route uncaught exceptions (GUI thread and worker threads) to the log and the window's status bar;
    restores the previous hooks on :meth:`uninstall`."""

    def __init__(self, window: MainWindow) -> None:
        self._window = window
        self._old_sys = sys.excepthook
        self._old_threading = threading.excepthook
        self._qt = _QtMessages()
        self._qt_installed = False

    def install(self, *, qt_messages: bool = True) -> None:
        sys.excepthook = self._sys_hook
        install_thread_excepthook(self._window.report_error)
        self._qt_installed = qt_messages
        if qt_messages:
            self._qt.previous = qInstallMessageHandler(self._qt)

    def uninstall(self) -> None:
        sys.excepthook = self._old_sys
        threading.excepthook = self._old_threading
        if self._qt_installed:
            qInstallMessageHandler(self._qt.previous)

    def _sys_hook(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        logger.error("Uncaught error: %s", "".join(traceback.format_exception(exc_type, exc, tb)).rstrip())
        self._window.report_error(f"Internal error: {exc}")


def run_app(session: SessionView, options: FrontendOptions) -> int:
    """Show the guidance window for ``session`` and run until it is closed; return the exit code.

    Starts the session after the window is shown and stops it on the way out, whatever happens. With
    ``options.frames`` set, quits after that many frames have been painted (exit code 1 if none is painted
    for :data:`NO_FRAMES_TIMEOUT_S`), saving ``options.screenshot`` just before.
    """
    app = ensure_application()
    apply_theme(app)
    window = MainWindow(session)
    window.setWindowTitle(options.title)
    hooks = _ErrorHooks(window)
    hooks.install()
    loop = QEventLoop()
    window.closed.connect(loop.quit)
    exit_code = 0

    def finish(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        if options.screenshot is not None:
            options.screenshot.parent.mkdir(parents=True, exist_ok=True)
            if not window.grab().save(str(options.screenshot)):
                logger.error("Could not save the screenshot to %s", options.screenshot)
                exit_code = exit_code or 1
        window.close()

    watchdog = QTimer(window)
    watchdog.setSingleShot(True)
    watchdog.setInterval(round(NO_FRAMES_TIMEOUT_S * 1000))

    def no_frames() -> None:
        logger.error("No frame was painted for %.0f s; giving up", NO_FRAMES_TIMEOUT_S)
        finish(1)

    watchdog.timeout.connect(no_frames)
    if options.frames is not None:
        wanted = max(int(options.frames), 0)

        def on_painted(_seq: int) -> None:
            watchdog.start()
            if window.painted_frames >= wanted and not window.closed_flag:
                finish(0)

        window.framePainted.connect(on_painted)

    # Let Ctrl+C in the terminal close the window: Python runs signal handlers only between bytecodes, so a
    # slow no-op timer hands control back to the interpreter now and then (GUI thread, not a hot path).
    sigint_timer = QTimer(window)
    old_sigint = None
    if threading.current_thread() is threading.main_thread():
        old_sigint = signal.signal(signal.SIGINT, lambda *_: window.close())
        sigint_timer.timeout.connect(lambda: None)
        sigint_timer.start(250)
    try:
        if options.fullscreen:
            window.showFullScreen()
        else:
            window.show()
        session.start()
        window.start_timers()
        if options.frames is not None:
            if options.frames <= 0:
                finish(0)
            else:
                watchdog.start()
        if not window.closed_flag:
            loop.exec()
    finally:
        sigint_timer.stop()
        watchdog.stop()
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
        window.shutdown()  # stops the session even when start() or the loop raised
        window.hide()
        hooks.uninstall()
        painted = window.painted_frames
        window.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    logger.info("Window closed after %d painted frames", painted)
    return exit_code
