"""Live image with the AI overlay, drawn with pyqtgraph.

Every graphics item is created once in ``__init__`` and updated in place (``setData``/``setImage``), so a
paint costs a texture upload and a few small polylines, never item churn. The image axis order is set
once for the process (row-major, like the numpy arrays we receive).

Coordinates: results are image pixels ``(x, y)`` with the origin at the centre of the top-left pixel
(``guidance.results``); ``ImageItem`` draws pixel (0, 0) over [0, 1] x [0, 1], so overlay items live in a
group shifted by half a pixel. The view box is in pixel units with its aspect ratio locked to the pixel
spacing, so a 0.2 x 0.3 mm pixel is drawn 2:3 wide:high.

Overlay age: the overlay belongs to the frame it was computed on. When the painted frame is newer, the
overlay's *age* is how much older its frame is than the painted one (``painted.receive_ns -
result.frame.receive_ns``) - exactly the window in which motion can misregister the contours. Past the
latency budget the overlay is drawn stale: grey, dashed, and a "STALE n ms" badge.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt
import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QFont, QPen
from PySide6.QtWidgets import QLabel, QWidget

from guidance.results import GuidanceResult, Polygon, overlay_is_stale
from streaming.frame import Frame
from ui import theme

logger = logging.getLogger(__name__)

pg.setConfigOptions(imageAxisOrder="row-major", antialias=True)

_EMPTY_XY: npt.NDArray[np.float32] = np.empty((0, 2), dtype=np.float32)


class OverlayState(Enum):
    """How the overlay relates to the painted frame."""

    NONE = "none"  # no result to show (none yet, or synchronised mode without this frame's result)
    CURRENT = "current"  # the result belongs to the painted frame
    LAGGING = "lagging"  # an older frame's result, still within the budget
    STALE = "stale"  # an older frame's result, older than the budget


@dataclass(frozen=True, slots=True)
class PaintPlan:
    """What one paint shows: which frame, which result (if any) and how old the overlay is."""

    frame: Frame | None
    result: GuidanceResult | None
    state: OverlayState
    age_ms: float  # 0 for CURRENT / NONE


def plan_paint(
    frame: Frame | None, result: GuidanceResult | None, *, synchronised: bool, budget_ms: float
) -> PaintPlan:
    """Decide what to paint from the newest frame and the newest result (pure; no Qt).

    Live mode paints the newest frame at once with the newest overlay, marking the overlay's age.
    Synchronised mode paints the frame the newest result was computed on, with that result only, so
    picture and overlay always match (the picture then lags by the inference time); before the first
    result it shows the live picture with no overlay.
    """
    if synchronised:
        if result is not None:
            return PaintPlan(result.frame, result, OverlayState.CURRENT, 0.0)
        return PaintPlan(frame, None, OverlayState.NONE, 0.0)
    if result is None:
        return PaintPlan(frame, None, OverlayState.NONE, 0.0)
    if frame is None or frame.seq == result.seq or frame.receive_ns <= result.frame.receive_ns:
        # The newest frame may be peeked a moment before its result is published, never after; a result
        # for a frame we have not painted yet is shown on its own frame.
        shown = result.frame if frame is None or frame.receive_ns < result.frame.receive_ns else frame
        return PaintPlan(shown, result, OverlayState.CURRENT, 0.0)
    age_ms = (frame.receive_ns - result.frame.receive_ns) / 1e6
    budget = budget_ms if budget_ms > 0 else result.budget_ms
    state = OverlayState.STALE if overlay_is_stale(age_ms, budget) else OverlayState.LAGGING
    return PaintPlan(frame, result, state, age_ms)


def contours_to_path(contours: tuple[Polygon, ...]) -> npt.NDArray[np.float32]:
    """Join closed contours into one (M, 2) array with NaN rows between them (``connect="finite"``)."""
    parts: list[npt.NDArray[np.float32]] = []
    nan_row = np.full((1, 2), np.nan, dtype=np.float32)
    for c in contours:
        pts = np.asarray(c, dtype=np.float32).reshape(-1, 2)
        if len(pts) == 0:
            continue
        if parts:
            parts.append(nan_row)
        parts.append(pts)
        parts.append(pts[:1])  # close the ring
    if not parts:
        return _EMPTY_XY
    return np.concatenate(parts, axis=0)


def clip_segment_end(
    start: tuple[float, float], end: tuple[float, float], width: int, height: int
) -> tuple[float, float]:
    """Shorten the segment ``start -> end`` so it stops at the image border (pixel-centre coordinates
    span ``[-0.5, width - 0.5] x [-0.5, height - 0.5]``); ``start`` is assumed inside."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = 1.0
    lo_x, hi_x, lo_y, hi_y = -0.5, width - 0.5, -0.5, height - 0.5
    if dx > 0 and x1 > hi_x:
        t = min(t, (hi_x - x0) / dx)
    elif dx < 0 and x1 < lo_x:
        t = min(t, (lo_x - x0) / dx)
    if dy > 0 and y1 > hi_y:
        t = min(t, (hi_y - y0) / dy)
    elif dy < 0 and y1 < lo_y:
        t = min(t, (lo_y - y0) / dy)
    t = max(t, 0.0)
    return (x0 + t * dx, y0 + t * dy)


def display_pixels(pixels: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """Return a view ``ImageItem`` can show: 2-D grey, or RGB for 3/4-component images (no copy)."""
    if pixels.ndim == 3:
        comps = pixels.shape[2]
        if comps == 1:
            return pixels[:, :, 0]
        if comps == 2:  # grey + alpha: show the grey
            return pixels[:, :, 0]
        return pixels[:, :, :3]
    return pixels


def default_levels(pixels: npt.NDArray[np.generic]) -> tuple[float, float]:
    """Display window for a source: full range for 8-bit, robust percentiles (once) for wider types."""
    if pixels.dtype == np.uint8:
        return (0.0, 255.0)
    sample = np.asarray(pixels)[::4, ::4]
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        if np.issubdtype(pixels.dtype, np.integer):
            return (0.0, float(np.iinfo(pixels.dtype.str).max))
        return (0.0, 1.0)
    return (lo, hi)


def _pen(colour: str, width: float, style: Qt.PenStyle = Qt.PenStyle.SolidLine) -> QPen:
    pen = QPen(QColor(colour))
    pen.setWidthF(width)
    pen.setStyle(style)
    pen.setCosmetic(True)
    pen.setCapStyle(Qt.PenCapStyle.RoundCap)
    pen.setJoinStyle(Qt.PenJoinStyle.RoundJoin)
    return pen


class _Pens:
    """Pens and brushes for the live and the stale look, built once."""

    def __init__(self) -> None:
        c = theme.COLOURS
        dash, dot = Qt.PenStyle.DashLine, Qt.PenStyle.DotLine
        self.instrument = {False: _pen(c.instrument, 2.5), True: _pen(c.stale, 2.0, dash)}
        self.target = {False: _pen(c.target, 2.5), True: _pen(c.stale, 2.0, dash)}
        self.centerline = {False: _pen(c.tip, 1.5), True: _pen(c.stale, 1.5, dash)}
        self.trajectory = {False: _pen(c.tip, 2.0, dash), True: _pen(c.stale, 2.0, dot)}
        self.marker_outline = _pen("#000000", 2.0)
        # A dark halo under every line keeps it visible on bright echoes (a needle shaft is near white).
        self.halo = _pen("#000000", 5.0)
        self.halo.setColor(QColor(0, 0, 0, 150))
        self.tip_brush = {False: pg.mkBrush(QColor(c.tip)), True: pg.mkBrush(QColor(c.stale))}
        self.centroid_brush = {False: pg.mkBrush(QColor(c.target)), True: pg.mkBrush(QColor(c.stale))}


class ImageView(pg.GraphicsLayoutWidget):  # type: ignore[misc]
    """A pyqtgraph view of one live image plus the guidance overlay.

    Call :meth:`show_plan` on the GUI thread with the output of :func:`plan_paint`.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent=parent)
        self.setObjectName("imageView")
        self.setBackground(theme.BACKGROUND)
        self.ci.setContentsMargins(0, 0, 0, 0)
        self.view: pg.ViewBox = self.addViewBox(lockAspect=True, enableMenu=False)
        self.view.invertY(True)  # row 0 at the top, like every medical image viewer
        self.view.setMouseEnabled(x=False, y=False)
        self.view.setDefaultPadding(0.0)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.image)

        self._pens = _Pens()
        self.overlay = pg.ItemGroup()
        self.overlay.setPos(0.5, 0.5)  # result coordinates are pixel centres
        self.overlay.setZValue(10)
        self.view.addItem(self.overlay, ignoreBounds=True)

        halo = self._pens.halo
        self.instrument_curve = pg.PlotCurveItem(
            connect="finite", pen=self._pens.instrument[False], shadowPen=halo
        )
        self.target_curve = pg.PlotCurveItem(connect="finite", pen=self._pens.target[False], shadowPen=halo)
        self.centerline_curve = pg.PlotCurveItem(pen=self._pens.centerline[False], shadowPen=halo)
        self.trajectory_curve = pg.PlotCurveItem(pen=self._pens.trajectory[False], shadowPen=halo)
        self.centroid_marker = pg.ScatterPlotItem(
            size=22, symbol="+", pen=self._pens.marker_outline, brush=self._pens.centroid_brush[False]
        )
        self.tip_marker = pg.ScatterPlotItem(
            size=16, symbol="o", pen=self._pens.marker_outline, brush=self._pens.tip_brush[False]
        )
        self.readout = pg.TextItem(
            "", color=theme.COLOURS.tip, anchor=(-0.12, 1.15), fill=pg.mkBrush(QColor(11, 13, 16, 190))
        )
        self.readout.setFont(_readout_font())
        for z, item in enumerate(
            (
                self.target_curve,
                self.instrument_curve,
                self.centerline_curve,
                self.trajectory_curve,
                self.centroid_marker,
                self.tip_marker,
                self.readout,
            )
        ):
            item.setZValue(z)
            item.setParentItem(self.overlay)

        self.badge = QLabel(self)
        self.badge.setObjectName("badge")
        self.badge.hide()
        self.banner = QLabel("Waiting for images…", self)
        self.banner.setObjectName("banner")
        self.banner.setAlignment(Qt.AlignmentFlag.AlignCenter)

        self.show_trajectory = True
        self.frozen = False
        self._shape: tuple[int, ...] | None = None
        self._dtype: np.dtype[np.generic] | None = None
        self._spacing: tuple[float, float] | None = None
        self._levels: tuple[float, float] = (0.0, 255.0)
        self._stale_look: bool | None = None
        self.painted_seq: int | None = None
        self._painted_frame: Frame | None = None
        self.overlay_seq: int | None = None
        self.state = OverlayState.NONE
        self.age_ms = 0.0
        self._set_stale_look(False)
        self._clear_overlay()

    # ------------------------------------------------------------------ painting
    def show_plan(self, plan: PaintPlan) -> None:
        """Paint ``plan`` (frame + overlay). Called on the GUI thread only."""
        if plan.frame is not None and plan.frame is not self._painted_frame:
            self.set_frame(plan.frame)
        self.set_overlay(plan.result, plan.state, plan.age_ms)

    def set_frame(self, frame: Frame) -> None:
        pixels = display_pixels(frame.pixels)
        if pixels.shape != self._shape or pixels.dtype != self._dtype:
            self._levels = default_levels(pixels)
            self._shape, self._dtype = pixels.shape, pixels.dtype
            self.image.setImage(pixels, autoLevels=False, levels=self._levels)
            self.view.setRange(xRange=(0, pixels.shape[1]), yRange=(0, pixels.shape[0]), padding=0.0)
            self.banner.hide()
        else:
            self.image.setImage(pixels, autoLevels=False, levels=self._levels)
        if frame.spacing_mm != self._spacing:
            sx, sy = frame.spacing_mm
            self._spacing = frame.spacing_mm
            ratio = sx / sy if sx > 0 and sy > 0 else 1.0
            self.view.setAspectLocked(True, ratio=ratio)
        self.painted_seq = frame.seq
        self._painted_frame = frame

    def set_banner(self, text: str) -> None:
        """Text shown centred over the view until the first frame arrives."""
        if self.banner.text() != text:
            self.banner.setText(text)
            self._place_banner()

    def set_levels(self, low: float, high: float) -> None:
        self._levels = (low, high)
        self.image.setLevels(self._levels)

    @property
    def painted_frame(self) -> Frame | None:
        """The frame on screen now (None before the first)."""
        return self._painted_frame

    @property
    def levels(self) -> tuple[float, float]:
        return self._levels

    def set_overlay(self, result: GuidanceResult | None, state: OverlayState, age_ms: float) -> None:
        self.state, self.age_ms = state, age_ms
        if result is None or state is OverlayState.NONE:
            self._clear_overlay()
            self._set_badge("", "")
            return
        stale = state is OverlayState.STALE
        self._set_stale_look(stale)
        if result.seq != self.overlay_seq:
            self._draw_geometry(result)
        if state is OverlayState.STALE:
            self._set_badge(f"STALE {age_ms:.0f} ms", "stale")
        elif state is OverlayState.LAGGING:
            self._set_badge(f"AI {age_ms:.0f} ms behind", "lagging")
        else:
            self._set_badge("", "")

    def _draw_geometry(self, result: GuidanceResult) -> None:
        interp = result.interpretation
        self.overlay_seq = result.seq
        inst = contours_to_path(interp.instrument_contours)
        self.instrument_curve.setData(inst[:, 0], inst[:, 1])
        tgt = contours_to_path(interp.target_contours)
        self.target_curve.setData(tgt[:, 0], tgt[:, 1])
        needle = interp.instrument
        if needle is not None:
            tx, ty = needle.tip_px
            self.tip_marker.setData(pos=[(tx, ty)])
            cl = np.asarray(needle.centerline_px, dtype=np.float32).reshape(-1, 2)
            self.centerline_curve.setData(cl[:, 0], cl[:, 1])
            ex, ey = clip_segment_end(
                (tx, ty), needle.trajectory_end_px, result.frame.width, result.frame.height
            )
            self.trajectory_curve.setData([tx, ex], [ty, ey])
            self.trajectory_curve.setVisible(self.show_trajectory)
            self.readout.setText(_readout_text(result))
            self.readout.setPos(tx, ty)
            self.readout.setVisible(bool(self.readout.toPlainText()))
        else:
            self.tip_marker.setData(pos=_EMPTY_XY)
            self.centerline_curve.setData(_EMPTY_XY[:, 0], _EMPTY_XY[:, 1])
            self.trajectory_curve.setData(_EMPTY_XY[:, 0], _EMPTY_XY[:, 1])
            self.readout.setVisible(False)
        if interp.target is not None:
            cx, cy = interp.target.centroid_px
            self.centroid_marker.setData(pos=[(cx, cy)])
        else:
            self.centroid_marker.setData(pos=_EMPTY_XY)
        self.overlay.setVisible(True)

    def _clear_overlay(self) -> None:
        self.overlay.setVisible(False)
        self.overlay_seq = None

    def _set_stale_look(self, stale: bool) -> None:
        if stale == self._stale_look:
            return
        self._stale_look = stale
        p = self._pens
        self.instrument_curve.setPen(p.instrument[stale])
        self.target_curve.setPen(p.target[stale])
        self.centerline_curve.setPen(p.centerline[stale])
        self.trajectory_curve.setPen(p.trajectory[stale])
        self.tip_marker.setBrush(p.tip_brush[stale])
        self.centroid_marker.setBrush(p.centroid_brush[stale])
        self.readout.setColor(QColor(theme.COLOURS.stale if stale else theme.COLOURS.tip))

    def _set_badge(self, text: str, state: str) -> None:
        if self.frozen:
            text, state = ("FROZEN  " + text).strip(), "frozen"
        if not text:
            self.badge.hide()
            return
        if self.badge.property("state") != state:
            self.badge.setProperty("state", state)
            self.badge.style().unpolish(self.badge)
            self.badge.style().polish(self.badge)
        self.badge.setText(text)
        self.badge.adjustSize()
        self.badge.move(16, 16)
        self.badge.show()

    # ------------------------------------------------------------------ toggles
    def set_show_trajectory(self, show: bool) -> None:
        self.show_trajectory = show
        self.trajectory_curve.setVisible(show)

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = frozen
        self.set_overlay_badge_refresh()

    def set_overlay_badge_refresh(self) -> None:
        if self.state is OverlayState.STALE:
            self._set_badge(f"STALE {self.age_ms:.0f} ms", "stale")
        elif self.state is OverlayState.LAGGING:
            self._set_badge(f"AI {self.age_ms:.0f} ms behind", "lagging")
        else:
            self._set_badge("", "")

    # ------------------------------------------------------------------ geometry helpers
    def image_to_widget(self, x: float, y: float) -> QPointF:
        """Map an image pixel coordinate (result convention) to this widget's coordinates."""
        scene = self.view.mapViewToScene(QPointF(x + 0.5, y + 0.5))
        return QPointF(self.mapFromScene(scene))

    def resizeEvent(self, event: object) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        if getattr(self, "banner", None) is not None:  # pyqtgraph calls this from its own __init__
            self._place_banner()

    def _place_banner(self) -> None:
        self.banner.adjustSize()
        self.banner.move(max(0, (self.width() - self.banner.width()) // 2), max(0, self.height() // 2 - 20))


def _readout_font() -> QFont:
    font = QFont()
    font.setPointSize(15)
    font.setWeight(QFont.Weight.Bold)
    return font


def _readout_text(result: GuidanceResult) -> str:
    mm = result.interpretation.tip_to_target_mm
    return "" if mm is None else f"{mm:.1f} mm"
