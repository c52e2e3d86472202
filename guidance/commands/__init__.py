"""CLI subcommands. Each module exposes ``register(subparsers)`` adding its parser with ``func`` set.

A command function takes the parsed ``argparse.Namespace`` and returns the process exit code. Long work
prints progress to stderr; failures raise :class:`guidance.cli.CommandError` (one-line reason, exit 1).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

logger = logging.getLogger(__name__)

# Order = order in ``guidance --help``. A module listed here that is not present yet is skipped quietly
# so work in progress elsewhere never breaks the CLI.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "bench",
    "simulate",
    "record",
    "replay",
    "export",
    "archive",
    "engines",
    "segment",
    "train",
    "evaluate",
    "calibrate",
    "soup",
)


def load_command_modules() -> list[ModuleType]:
    mods = []
    for name in COMMAND_MODULES:
        try:
            mods.append(importlib.import_module(f"guidance.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"guidance.commands.{name}":
                raise
    return mods
