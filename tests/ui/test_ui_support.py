"""Builders shared by the UI tests: synthetic frames and results with known geometry, and a small
stand-in session for tests that must control exactly what the window sees. (Tests of the whole window
use the real ``guidance.session.LiveSession``.)"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PySide6.QtCore import QPoint
from PySide6.QtGui import QColor

from guidance.config import Settings
from guidance.latency import StageTimes
from guidance.results import GuidanceResult, InstrumentEstimate, Interpretation, TargetEstimate
from streaming.frame import Frame
from ui.main_window import MainWindow

TIP = (150.0, 110.0)
ENTRY = (40.0, 30.0)
TARGET_CENTRE = (190.0, 170.0)


def make_frame(seq: int, *, receive_ns: int | None = None, dtype: type = np.uint8, size: int = 256) -> Frame:
    yy, xx = np.mgrid[0:size, 0:size]
    base = (40 + 30 * np.sin(xx / 9.0 + seq * 0.2) + 20 * np.cos(yy / 13.0)).clip(0, 255)
    pixels = base.astype(np.uint8) if dtype is np.uint8 else (base * 200).astype(np.uint16)
    wall, mono = Frame.now()
    return Frame(
        seq=seq,
        device="Image_Reference",
        pixels=pixels,
        spacing_mm=(0.3, 0.3),
        receive_wall_ns=wall,
        receive_ns=mono if receive_ns is None else receive_ns,
    )


def _circle(cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).astype(np.float32)


def make_result(frame: Frame, *, budget_ms: float = 33.3, with_instrument: bool = True) -> GuidanceResult:
    tip, entry = np.array(TIP), np.array(ENTRY)
    d = (tip - entry) / np.linalg.norm(tip - entry)
    normal = np.array([-d[1], d[0]])
    shaft = np.array([entry + 2 * normal, tip + 2 * normal, tip - 2 * normal, entry - 2 * normal], np.float32)
    needle = InstrumentEstimate(
        tip_px=TIP,
        raw_tip_px=TIP,
        entry_px=ENTRY,
        direction=(float(d[0]), float(d[1])),
        angle_deg=36.0,
        length_mm=41.0,
        confidence=0.91,
        trajectory_end_px=(255.0, 187.0),
        centerline_px=np.array([ENTRY, TIP], dtype=np.float32),
    )
    target = TargetEstimate(
        centroid_px=TARGET_CENTRE,
        area_mm2=95.0,
        equivalent_diameter_mm=11.0,
        contour_px=_circle(*TARGET_CENTRE, 18),
    )
    interp = Interpretation(
        instrument=needle if with_instrument else None,
        target=target,
        instrument_contours=(shaft,) if with_instrument else (),
        target_contours=(target.contour_px,),
        tip_to_target_mm=21.4 if with_instrument else None,
        tip_to_boundary_mm=16.0 if with_instrument else None,
        on_path=True if with_instrument else None,
        status="ok" if with_instrument else "no instrument",
    )
    r = frame.receive_ns
    times = StageTimes(
        received=r,
        infer_start=r + 1_000_000,
        infer_end=r + 6_000_000,
        interpreted=r + 7_000_000,
        published=r + 7_500_000,
    )
    labels = np.zeros(frame.pixels.shape[:2], np.uint8)
    return GuidanceResult(
        frame=frame, labels=labels, interpretation=interp, times=times, engine="test", budget_ms=budget_ms
    )


@dataclass
class FakeStats:
    input_fps: float = 30.0
    processed_fps: float = 29.8
    frames_received: int = 100
    frames_processed: int = 98
    frames_skipped: int = 2
    over_budget: int = 0
    stale_paints: int = 1
    engine_errors: int = 0
    budget_ms: float = 33.3
    engine_label: str = "classical (cpu, n/a)"
    engine_model: str = "hessian-ridge+hough / dark-blob (polarity bright)"
    engine_note: str = ""
    connection: str = "connected"
    last_error: str = ""
    source: str = "simulated us (30 fps)"
    latency: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: MappingProxyType(
            {"receive_to_result": {"p50": 7.4, "p99": 12.9, "max": 15.0}}
        )
    )
    last_ms: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType(
            {"queue": 1.0, "infer": 5.0, "interpret": 1.0, "receive_to_result": 7.5}
        )
    )


class ScriptedSession:
    """Returns exactly the frame/result the test sets; records mark_painted calls. No threads."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.synchronised = False
        self.frame: Frame | None = None
        self.result: GuidanceResult | None = None
        self.painted: list[int] = []
        self.started = self.stopped = 0
        self.fake_stats = FakeStats()

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def latest_frame(self) -> Frame | None:
        return self.frame

    def latest_result(self) -> GuidanceResult | None:
        return self.result

    def stats(self) -> FakeStats:
        return self.fake_stats

    def mark_painted(self, frame_seq: int, now_ns: int | None = None, *, stale: bool = False) -> None:
        self.painted.append(frame_seq)

    def report_error(self, message: str) -> None:
        self.fake_stats.last_error = message

    # Recording is exercised for real in test_ui_live.py; this scripted session is never recording.
    recording_path = None

    def start_recording(self, path: Path, metadata: object = None) -> object:
        raise RuntimeError("the scripted session has no stream to record")

    def stop_recording(self) -> None:
        return None

    def add_marker(self, label: str) -> bool:
        return False


def window_pixel(w: MainWindow, x: float, y: float) -> QColor:
    p = w.view.image_to_widget(x, y)
    in_window = w.view.mapTo(w, QPoint(round(p.x()), round(p.y())))
    img = w.grab().toImage()
    scale = img.devicePixelRatio()
    return img.pixelColor(round(in_window.x() * scale), round(in_window.y() * scale))


def close_colour(a: QColor, hex_colour: str, tol: int = 40) -> bool:
    b = QColor(hex_colour)
    return max(abs(a.red() - b.red()), abs(a.green() - b.green()), abs(a.blue() - b.blue())) <= tol


def now_ns() -> int:
    return time.perf_counter_ns()
