"""How the headless application finds its graphical front end without importing it.

``guidance`` must not import ``ui`` (layering, checked by import-linter), yet ``guidance demo`` opens a
window. The UI package registers itself under the ``guidance.frontends`` entry-point group (see
``pyproject.toml``); the CLI looks it up by name at run time. This is dependency inversion through the
packaging metadata, the same mechanism napari uses for its plugins, so the core stays testable headless and
another front end (a web viewer, a kiosk shell) can be dropped in without touching ``guidance``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from guidance.session import LiveSession

ENTRY_POINT_GROUP = "guidance.frontends"


@dataclass(frozen=True, slots=True)
class FrontendOptions:
    """What the CLI asks of a front end."""

    frames: int | None = None  # quit after this many frames have been painted
    screenshot: Path | None = None  # save a PNG of the window just before quitting
    title: str = "Guidance"
    fullscreen: bool = False


Frontend = Callable[["LiveSession", FrontendOptions], int]


class FrontendUnavailable(RuntimeError):
    pass


def load_frontend(name: str = "qt") -> Frontend:
    """Return the front end registered as ``name`` or raise :class:`FrontendUnavailable` with the reason."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise FrontendUnavailable(
            f"no '{name}' front end is installed (entry point group {ENTRY_POINT_GROUP}); "
            "install the project with `pip install -e .` so the ui package registers itself"
        )
    try:
        return cast("Frontend", matches[0].load())
    except ImportError as exc:
        raise FrontendUnavailable(f"the '{name}' front end failed to import: {exc}") from exc
