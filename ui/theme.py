"""Dark, high-contrast clinical theme.

Design choices (the app is read at the table side, 1-2 m away, often in a dimmed room):

* Fusion style with a near-black palette: the image is the brightest thing on the screen and nothing
  around it competes with it.
* One large numeral (the tip-to-target distance) uses a heavy tabular font so its width does not jump
  as digits change.
* Overlay colours come from a colour-blind safe set: the instrument is cyan (contour) with a yellow tip,
  the target is magenta. Cyan/yellow/magenta stay apart for deuteranopia, protanopia and tritanopia,
  and each is also told apart by *shape* (solid contour vs. filled tip marker vs. cross-hair centroid).
  A stale overlay is drawn grey and dashed, so "late" does not depend on colour either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtGui import QColor, QFont, QIcon, QPalette
from PySide6.QtWidgets import QApplication, QStyleFactory


@dataclass(frozen=True, slots=True)
class OverlayColours:
    """Overlay colours as ``#rrggbb`` strings (shared by the image view, the panel and the tests)."""

    instrument: str = "#00e5ff"  # cyan: instrument contour and centre line
    tip: str = "#ffe600"  # yellow: needle tip marker and trajectory
    target: str = "#ff3df2"  # magenta: target contour and centroid
    stale: str = "#8a8f98"  # grey: an overlay older than the latency budget
    ok: str = "#3ddc84"  # on path / healthy
    warn: str = "#ffb020"  # off path / low confidence (always paired with a word, never colour alone)
    error: str = "#ff5c5c"


COLOURS = OverlayColours()

BACKGROUND = "#0b0d10"
PANEL = "#14171c"
PANEL_BORDER = "#262b33"
TEXT = "#e8ebef"
TEXT_DIM = "#9aa3ad"
ACCENT = "#00e5ff"

#: Point size of the big distance numeral (read from 1-2 m away).
BIG_NUMERAL_PT = 56
#: Point size of the secondary readouts (fps, latency).
READOUT_PT = 13


def big_numeral_font() -> QFont:
    font = QFont()
    font.setFamilies(["DejaVu Sans", "Segoe UI", "Helvetica Neue", "Arial"])
    font.setPointSize(BIG_NUMERAL_PT)
    font.setWeight(QFont.Weight.Bold)
    font.setStyleHint(QFont.StyleHint.SansSerif)
    return font


def palette() -> QPalette:
    pal = QPalette()
    bg, panel, text = QColor(BACKGROUND), QColor(PANEL), QColor(TEXT)
    role = QPalette.ColorRole
    pal.setColor(role.Window, bg)
    pal.setColor(role.WindowText, text)
    pal.setColor(role.Base, panel)
    pal.setColor(role.AlternateBase, bg)
    pal.setColor(role.ToolTipBase, panel)
    pal.setColor(role.ToolTipText, text)
    pal.setColor(role.Text, text)
    pal.setColor(role.Button, panel)
    pal.setColor(role.ButtonText, text)
    pal.setColor(role.BrightText, QColor(COLOURS.error))
    pal.setColor(role.Highlight, QColor(ACCENT))
    pal.setColor(role.HighlightedText, bg)
    pal.setColor(role.Link, QColor(ACCENT))
    pal.setColor(role.PlaceholderText, QColor(TEXT_DIM))
    disabled = QPalette.ColorGroup.Disabled
    for r in (role.WindowText, role.Text, role.ButtonText):
        pal.setColor(disabled, r, QColor(TEXT_DIM))
    return pal


STYLESHEET = f"""
QMainWindow, QWidget#central {{ background: {BACKGROUND}; }}
QWidget {{ color: {TEXT}; font-size: {READOUT_PT}pt; }}
QFrame#sidePanel {{ background: {PANEL}; border-left: 1px solid {PANEL_BORDER}; }}
QFrame#card {{ background: {BACKGROUND}; border: 1px solid {PANEL_BORDER}; border-radius: 10px; }}
QLabel#caption {{ color: {TEXT_DIM}; font-size: 10pt; font-weight: 600; letter-spacing: 1px; }}
QLabel#distance {{ font-size: {BIG_NUMERAL_PT}pt; font-weight: 800; }}
QLabel#distanceUnit {{ color: {TEXT_DIM}; font-size: 20pt; font-weight: 600; }}
QLabel#pathState {{ font-size: 17pt; font-weight: 700; }}
QLabel#detail {{ color: {TEXT_DIM}; font-size: 12pt; }}
QLabel#metricName {{ color: {TEXT_DIM}; font-size: 11pt; }}
QLabel#metricValue {{ color: {TEXT}; font-size: 13pt; font-weight: 600; }}
QLabel#modeChip {{ color: {TEXT_DIM}; font-size: 10pt; font-weight: 700; border: 1px solid {PANEL_BORDER};
    border-radius: 8px; padding: 3px 8px; }}
QLabel#modeChip[active="true"] {{ color: {BACKGROUND}; background: {ACCENT}; border-color: {ACCENT}; }}
QLabel#recChip {{ color: {TEXT_DIM}; font-size: 10pt; font-weight: 700; border: 1px solid {PANEL_BORDER};
    border-radius: 6px; padding: 3px 8px; }}
QLabel#recChip[active="true"] {{ color: white; background: #d32f2f; border-color: #d32f2f; }}
QLabel#badge {{ color: {BACKGROUND}; background: {COLOURS.stale}; font-size: 14pt; font-weight: 800;
    border-radius: 6px; padding: 4px 10px; }}
QLabel#badge[state="stale"] {{ background: {COLOURS.warn}; }}
QLabel#badge[state="frozen"] {{ background: {ACCENT}; }}
QLabel#banner {{ color: {TEXT}; background: rgba(11, 13, 16, 200); font-size: 16pt; font-weight: 600;
    border-radius: 8px; padding: 8px 14px; }}
QStatusBar {{ background: {PANEL}; color: {TEXT_DIM}; border-top: 1px solid {PANEL_BORDER};
    font-size: 11pt; }}
QStatusBar QLabel {{ color: {TEXT_DIM}; font-size: 11pt; padding: 0 8px; }}
QStatusBar QLabel#statusError {{ color: {COLOURS.error}; font-weight: 600; }}
QToolTip {{ background: {PANEL}; color: {TEXT}; border: 1px solid {PANEL_BORDER}; }}
"""


ICON_PATH = Path(__file__).with_name("icons") / "guidance.svg"


def app_icon() -> QIcon:
    """The application icon (empty when the SVG is missing from the install)."""
    return QIcon(str(ICON_PATH)) if ICON_PATH.is_file() else QIcon()


def apply_theme(app: QApplication) -> None:
    """Apply the dark clinical theme to ``app`` (Fusion style, dark palette, stylesheet, icon)."""
    app.setWindowIcon(app_icon())
    style = QStyleFactory.create("Fusion")
    if style is not None:
        app.setStyle(style)
    app.setPalette(palette())
    app.setStyleSheet(STYLESHEET)
