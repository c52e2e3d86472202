"""Measure what one repaint costs on the GUI thread (new frame + new overlay), offscreen.

Run: ``QT_QPA_PLATFORM=offscreen .venv/bin/python -m ui.paint_bench [--frames 300]``. Prints one line per
image size with the p50/p99/max time of ``MainWindow.paint_plan`` followed by a forced render of the view
(``viewport().repaint()``), i.e. what the paint timer spends per new frame: wall time, and the GUI thread's
CPU time (the steadier figure on a shared machine). Offscreen means Qt's software rasteriser.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from guidance.latency import LatencyHistogram, StageTimes
from guidance.results import GuidanceResult, InstrumentEstimate, Interpretation, TargetEstimate
from streaming.frame import Frame


def _result(frame: Frame) -> GuidanceResult:
    h, w = frame.height, frame.width
    tip, entry = (0.6 * w, 0.45 * h), (0.1 * w, 0.1 * h)
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    ring = np.stack([0.75 * w + 0.07 * w * np.cos(t), 0.7 * h + 0.07 * h * np.sin(t)], 1).astype(np.float32)
    shaft = np.array([entry, tip, (tip[0] + 3, tip[1] + 3), (entry[0] + 3, entry[1] + 3)], np.float32)
    needle = InstrumentEstimate(
        tip_px=tip,
        raw_tip_px=tip,
        entry_px=entry,
        direction=(0.8, 0.6),
        angle_deg=37.0,
        length_mm=40.0,
        confidence=0.9,
        trajectory_end_px=(w - 1.0, 0.8 * h),
        centerline_px=np.array([entry, tip], np.float32),
    )
    target = TargetEstimate(
        centroid_px=(0.75 * w, 0.7 * h), area_mm2=90, equivalent_diameter_mm=10, contour_px=ring
    )
    interp = Interpretation(needle, target, (shaft,), (ring,), 20.0, 15.0, True, "ok")
    times = StageTimes(received=frame.receive_ns, published=frame.receive_ns + 1)
    return GuidanceResult(frame, np.zeros((h, w), np.uint8), interp, times, "bench", 33.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    from ui.image_view import plan_paint
    from ui.main_window import MainWindow
    from ui.theme import apply_theme

    class _Idle:
        """A session that is never started: the bench drives the window directly."""

        def __init__(self) -> None:
            from guidance.config import Settings

            self.settings = Settings()
            self.synchronised = False

        def start(self) -> None: ...
        def stop(self) -> None: ...
        def latest_frame(self) -> None: ...
        def latest_result(self) -> None: ...
        def stats(self) -> None: ...
        def mark_painted(self, frame_seq: int, now_ns: int, *, stale: bool = False) -> None: ...
        def report_error(self, message: str) -> None: ...

    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    apply_theme(app)
    window = MainWindow(_Idle())  # type: ignore[arg-type]
    window.resize(1280, 800)
    window.show()
    app.processEvents()
    rng = np.random.default_rng(0)
    for (h, w), dtype in (
        ((256, 256), np.uint8),
        ((600, 800), np.uint8),
        ((1080, 1920), np.uint8),
        ((1024, 1024), np.uint16),
    ):
        hist = LatencyHistogram(f"{w}x{h}")
        cpu = LatencyHistogram(f"{w}x{h} cpu")
        info = np.iinfo(dtype)
        pool = [rng.integers(0, int(info.max) // 4, (h, w), dtype=dtype) for _ in range(4)]
        for i in range(args.frames):
            wall, mono = Frame.now()
            frame = Frame(seq=i, device="bench", pixels=pool[i % 4], receive_wall_ns=wall, receive_ns=mono)
            plan = plan_paint(frame, _result(frame), synchronised=False, budget_ms=33.3)
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            window.paint_plan(plan)
            window.view.viewport().repaint()
            cpu.record_ns(time.thread_time_ns() - c0)
            hist.record_ns(time.perf_counter_ns() - t0)
        s, c = hist.summary(), cpu.summary()
        sys.stdout.write(
            f"{w}x{h} {np.dtype(dtype).name}: paint wall p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms  "
            f"max {s['max']:.2f} ms | GUI-thread CPU p50 {c['p50']:.2f} ms  p99 {c['p99']:.2f} ms "
            f"({args.frames} frames)\n"
        )
    window.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
