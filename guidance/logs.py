"""Logging setup: one format with thread names, and routing of uncaught errors from any thread."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

#: Receives a one-line error description (e.g. the UI's status bar).
ErrorSink = Callable[[str], None]

FORMAT = "%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s: %(message)s"


def configure_logging(verbosity: int = 0, log_file: str | None = None) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)


def install_thread_excepthook(report: ErrorSink | None = None) -> None:
    """Route uncaught exceptions from worker threads to the log (and to ``report``, e.g. the UI)."""

    def hook(args: threading.ExceptHookArgs) -> None:
        logging.getLogger("guidance.threads").error(
            "Uncaught error in thread %s",
            args.thread.name if args.thread else "?",
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )
        if report is not None and args.exc_value is not None:
            report(f"{args.thread.name if args.thread else 'worker'}: {args.exc_value}")

    threading.excepthook = hook
