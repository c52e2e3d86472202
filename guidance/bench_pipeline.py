"""``guidance bench pipeline``: the simulated stream over loopback OpenIGTLink through the live pipeline.

Headless: the same :class:`LiveSession` the app displays, without a window. Reports frame counts and
latency percentiles (``receive_to_result`` on the monotonic clock; ``sent_to_result`` from the sender's
wall-clock stamp, valid because sender and receiver share the host clock).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from engines.base import EngineInfo, SegmentationEngine, SegmentationOutput
from guidance.bench_report import write_pipeline_report
from guidance.bench_series import ResultSeries, SampleSeries, soak_summary
from guidance.config import Settings, load_settings, replace
from guidance.session import LiveSession

logger = logging.getLogger(__name__)

REPORTED = ("p50", "p90", "p99", "p99.9", "max")


class SlowedEngine:
    """Wraps an engine and sleeps ``delay_ms`` per inference: the "artificially slowed engine" of the bench.

    Used to show that the display path stays live and that skipped/stale counts are right when the model
    runs over budget. ``time.sleep`` releases the GIL like a real engine's native call does.
    """

    def __init__(self, inner: SegmentationEngine, delay_ms: float) -> None:
        self.inner = inner
        self.delay_s = delay_ms / 1000.0
        self.name = f"{inner.name}+slow{delay_ms:g}ms"

    def load(self) -> None:
        self.inner.load()

    def warm_up(self) -> None:
        self.inner.warm_up()

    def infer(self, image: Any) -> SegmentationOutput:
        time.sleep(self.delay_s)
        return self.inner.infer(image)

    def reset(self) -> None:
        self.inner.reset()

    def describe(self) -> EngineInfo:
        d = self.inner.describe()
        return EngineInfo(
            d.backend, d.device, d.precision, d.input_size, f"{d.model} (+{self.delay_s * 1e3:g} ms)"
        )

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True, slots=True)
class PipelineBenchConfig:
    frames: int = 300
    fps: float = 30.0
    width: int = 256
    height: int = 256
    modality: str = "us"
    backend: str = "auto"
    model: str = ""
    slow_ms: float = 0.0
    budget_ms: float = 0.0
    seed: int = 0
    report_dir: Path | None = None
    step_down: str | None = None  # None: as in the settings
    soak_window_s: float = 0.0  # >0: report steadiness (memory, first vs last window p99)


def run_pipeline_bench(cfg: PipelineBenchConfig, *, progress: bool = True) -> dict[str, Any]:
    base = load_settings()
    # Start from the user's settings (file + environment) and override only what the bench controls.
    settings: Settings = replace(
        base,
        simulator=dataclasses.replace(
            base.simulator,
            modality=cfg.modality,
            fps=cfg.fps,
            width=cfg.width,
            height=cfg.height,
            seed=cfg.seed,
        ),
        engine=dataclasses.replace(
            base.engine,
            backend=cfg.backend,
            model=cfg.model,
            budget_ms=cfg.budget_ms,
            step_down=base.engine.step_down if cfg.step_down is None else cfg.step_down,
        ),
    )
    engine: SegmentationEngine | None = None
    if cfg.slow_ms > 0:
        from engines import registry

        inner = registry.create(cfg.backend, **({"model": cfg.model} if cfg.model else {}))
        engine = SlowedEngine(inner, cfg.slow_ms)
    t0_ns = time.perf_counter_ns()
    series = ResultSeries(t0_ns, capacity=cfg.frames + 64)  # preallocated: no growth steps in RSS
    samples = SampleSeries()
    session = LiveSession(
        settings, simulate=True, engine=engine, max_frames=cfg.frames, result_sinks=(series,)
    )
    proc = psutil.Process(os.getpid())
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    session.start()
    sim = session.simulator
    assert sim is not None
    try:
        expected = cfg.frames / cfg.fps
        deadline = time.monotonic() + expected * 3 + 30
        last_print = 0.0
        # Once a second: memory and counters for the time series (and progress on a terminal).
        while not sim.done.wait(1.0):
            st = session.stats()
            samples.add(
                (time.perf_counter_ns() - t0_ns) / 1e9,
                proc.memory_info().rss / 2**20,
                st.input_fps,
                st.processed_fps,
                st.frames_received,
                st.frames_processed,
                st.frames_skipped,
                st.over_budget,
            )
            if time.monotonic() > deadline:
                logger.error("bench: simulator did not finish in time")
                break
            if progress and time.monotonic() - last_print > 1.0:
                print(
                    f"\r  sent {sim.stats().frames_sent}/{cfg.frames}  received {st.frames_received}  "
                    f"processed {st.frames_processed}  skipped {st.frames_skipped}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
                last_print = time.monotonic()
        # Let the last frames arrive and the worker finish the newest one (bounded).
        settle = time.monotonic() + 2.0
        while time.monotonic() < settle and not _drained(session, sim.stats().frames_sent):
            time.sleep(0.05)
    finally:
        wall = time.perf_counter() - t0
        stats = session.stats()
        sent = sim.stats().frames_sent
        late = sim.stats().late_ticks
        session.stop()
    if progress:
        print(file=sys.stderr)
    cpu1 = proc.cpu_times()
    lat = stats.latency

    def pick(name: str) -> dict[str, float]:
        h = lat.get(name, {})
        return {k: round(float(h.get(k, math.nan)), 3) for k in REPORTED}

    transport_lost = max(sent - stats.frames_received, 0)
    result_rows = series.array()
    sample_rows = samples.array()
    extra: dict[str, Any] = {}
    if cfg.soak_window_s > 0:
        extra["soak"] = soak_summary(result_rows, sample_rows, cfg.soak_window_s)
    report = {
        "bench": "pipeline",
        "frames_sent": sent,
        "frames_received": stats.frames_received,
        "frames_processed": stats.frames_processed,
        "frames_dropped": stats.frames_skipped + transport_lost,
        "frames_skipped_by_ai": stats.frames_skipped,
        "frames_lost_in_transport": transport_lost,
        "over_budget": stats.over_budget,
        "engine_errors": stats.engine_errors,
        "simulator_late_ticks": late,
        "engine": stats.engine_label,
        "budget_ms": round(stats.budget_ms, 3),
        "fps": cfg.fps,
        "size": f"{cfg.width}x{cfg.height}",
        "modality": cfg.modality,
        "slow_ms": cfg.slow_ms,
        "wall_s": round(wall, 3),
        "cpu_s_per_frame": round(
            ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / max(stats.frames_received, 1), 6
        ),
        "latency_ms": {
            "receive_to_result": pick("receive_to_result"),
            "sent_to_result": pick("sent_to_result"),
            "sent_to_received": pick("sent_to_received"),
            "queue": pick("queue"),
            "infer": pick("infer"),
            "interpret": pick("interpret"),
        },
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "rss_mb_max": round(float(sample_rows[:, 1].max()), 1) if len(sample_rows) else math.nan,
        **extra,
    }
    if cfg.report_dir is not None:
        report["report_html"] = str(write_pipeline_report(cfg.report_dir, report, result_rows, sample_rows))
    return report


def _drained(session: LiveSession, sent: int) -> bool:
    frame, result = session.display.peek(), session.results.peek()
    return (
        session.stats().frames_received >= sent
        and frame is not None
        and result is not None
        and result.seq == frame.seq
    )


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"pipeline bench: {report['size']} {report['modality']} at {report['fps']:g} fps, engine {report['engine']}",
        f"  frames sent {report['frames_sent']}, received {report['frames_received']}, processed "
        f"{report['frames_processed']}, dropped {report['frames_dropped']} "
        f"(skipped by AI {report['frames_skipped_by_ai']}, lost in transport {report['frames_lost_in_transport']}), "
        f"over budget ({report['budget_ms']:.1f} ms) {report['over_budget']}",
        f"  {'latency (ms)':<20}" + "".join(f"{k:>9}" for k in REPORTED),
    ]
    for name, row in report["latency_ms"].items():
        lines.append(f"  {name:<20}" + "".join(f"{row[k]:>9.2f}" for k in REPORTED))
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n", encoding="utf-8")
