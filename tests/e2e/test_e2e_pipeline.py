"""The whole path for real: phantom -> our OpenIGTLink server -> loopback TCP -> our client -> pipeline
-> classical engine -> interpretation, checked against the phantom's ground truth."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from engines import registry
from guidance.bench_pipeline import SlowedEngine
from guidance.config import EngineSettings, Settings, SimulatorSettings
from guidance.phantoms import make_phantom
from guidance.results import GuidanceResult
from guidance.session import LiveSession
from guidance.simulator import phantom_overrides

SIM = SimulatorSettings(modality="us", fps=30.0, width=256, height=256, seed=3)


def _collect(session: LiveSession, n_frames: int, timeout_s: float) -> dict[int, GuidanceResult]:
    """Sample the result slot the way the painter does (peek) until the simulator has sent everything."""
    results: dict[int, GuidanceResult] = {}
    sim = session.simulator
    assert sim is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = session.latest_result()
        if r is not None:
            results[r.seq] = r
        if sim.done.is_set() and r is not None and r.seq >= session.stats().frames_received - 1:
            break
        time.sleep(0.005)
    return results


def test_needle_tip_over_loopback_matches_ground_truth() -> None:
    settings = Settings(simulator=SIM, engine=EngineSettings(backend="classical"))
    n = 150  # 5 s: the needle enters, advances and reaches the target
    with LiveSession(settings, simulate=True, max_frames=n) as session:
        results = _collect(session, n, timeout_s=30)
        stats = session.stats()
    assert stats.frames_received == n, "every frame crosses the socket (loopback, 30 fps)"
    assert stats.connection in {"connected", "stopped"}
    assert len(results) >= n // 3, "the pipeline keeps up with most frames"

    phantom = make_phantom(
        "us",
        seed=SIM.seed,
        width=SIM.width,
        height=SIM.height,
        fps=SIM.fps,
        **phantom_overrides("us", SIM.scene),
    )
    errors_mm: list[float] = []
    judged = 0
    for r in results.values():
        truth = phantom.frame(int(r.frame.metadata["FrameIndex"]))
        assert np.array_equal(r.frame.pixels, truth.image), "pixels bit-exact after the socket"
        assert r.frame.spacing_mm == pytest.approx(truth.spacing_mm)
        inst = r.interpretation.instrument
        # Judge frames where the needle is clearly in the picture (>= 8 mm of shaft): while only its first
        # millimetres have entered, a classical line fit can legitimately prefer a brighter distractor.
        if (
            truth.instrument_present
            and truth.tip_px is not None
            and truth.entry_px is not None
            and math.dist(truth.tip_px, truth.entry_px) * truth.spacing_mm[0] >= 8.0
        ):
            judged += 1
            if inst is None:
                continue
            dx = (inst.raw_tip_px[0] - truth.tip_px[0]) * truth.spacing_mm[0]
            dy = (inst.raw_tip_px[1] - truth.tip_px[1]) * truth.spacing_mm[1]
            errors_mm.append(math.hypot(dx, dy))
        assert r.times.received <= r.times.infer_start <= r.times.infer_end <= r.times.published
    assert judged >= 10
    assert len(errors_mm) >= 0.8 * judged, "the classical baseline finds a clearly visible needle"
    # Tolerance: the phantom draws a needle ~3 px (0.6 mm) thick whose tip fades over a few pixels; a
    # line fit's end point lands within that fade. 2 mm median / 4 mm p90 is what a classical baseline
    # can promise at 0.2 mm/px; the trained model's targets (issue 4) are tighter and measured there.
    assert float(np.median(errors_mm)) <= 2.0, errors_mm
    assert float(np.percentile(errors_mm, 90)) <= 4.0, errors_mm
    lat = stats.latency["receive_to_result"]
    assert lat["count"] >= len(results)
    assert lat["p50"] > 0


def test_slow_engine_skips_frames_and_marks_results_late() -> None:
    """An engine 3x over budget: the display keeps receiving every frame, the AI skips, nothing queues."""
    settings = Settings(simulator=SIM, engine=EngineSettings(backend="classical"))
    engine = SlowedEngine(registry.create("classical"), delay_ms=100.0)
    n = 45
    with LiveSession(settings, simulate=True, engine=engine, max_frames=n) as session:
        sim = session.simulator
        assert sim is not None
        assert sim.done.wait(10)
        time.sleep(0.3)
    # Read after stop(): the worker has finished any inference in flight, so the counts are final.
    stats = session.stats()
    newest = session.latest_frame()
    assert stats.frames_received == n, "the display path receives every frame"
    assert newest is not None
    assert newest.seq == n - 1, "the painter always has the newest frame"
    assert stats.frames_skipped >= n // 2, "a 100 ms engine at 30 fps must skip about 2 of 3 frames"
    # No backlog, by construction and by count: every frame was either processed or counted as skipped;
    # at most the newest one can still sit untaken in the one-element slot.
    assert n - 1 <= stats.frames_processed + stats.frames_skipped <= n
    assert stats.frames_processed <= n // 2
    assert stats.over_budget == stats.frames_processed, "every result is over the 33 ms budget"


def test_engine_steps_down_when_it_keeps_missing_the_budget() -> None:
    """A primary engine 2x over budget is replaced by the configured faster fallback; the change is logged."""
    settings = Settings(simulator=SIM, engine=EngineSettings(backend="classical", step_down="classical"))

    class _Named(SlowedEngine):
        """Reports a backend name of its own so the step-down list does not skip 'classical'."""

        def describe(self):  # type: ignore[no-untyped-def]
            d = super().describe()
            return type(d)("slowed", d.device, d.precision, d.input_size, d.model)

    engine = _Named(registry.create("classical"), delay_ms=70.0)
    n = 240  # ~8 s: the policy waits for ~2 s (60 results) of sustained overload before stepping down
    with LiveSession(settings, simulate=True, engine=engine, max_frames=n) as session:
        sim = session.simulator
        assert sim is not None
        assert sim.done.wait(20)
        time.sleep(0.2)
    stats = session.stats()
    assert any("stepped down" in c for c in stats.engine_changes), stats.engine_changes
    assert stats.engine_label.startswith("classical"), stats.engine_label


def test_accelerated_engine_built_in_background_is_swapped_in_while_cpu_serves() -> None:
    """The TensorRT path: the session serves with a CPU engine while a BuildJob runs, then swaps the built
    engine in between two frames. TensorRT is not installable here, so the job builds nothing and the
    "accelerated" backend is the classical one; the hand-over under test is the session's."""
    import threading

    from engines.backends.tensorrt_backend import BuildJob, BuildReporter

    release = threading.Event()

    def fake_build(reporter: BuildReporter) -> tuple[str, str]:
        for step in range(3):
            reporter.phase("building", step, 3)
            release.wait(0.05)
        release.wait(5)  # hold the build until the CPU engine has served frames
        return "fp16", "/nonexistent/engine.plan"

    class _Cpu(SlowedEngine):
        def describe(self):  # type: ignore[no-untyped-def]
            d = super().describe()
            return type(d)("cpu-stand-in", d.device, d.precision, d.input_size, d.model)

    def start_job() -> BuildJob:
        job = BuildJob(fake_build)
        job.start()
        return job

    settings = Settings(simulator=SIM, engine=EngineSettings(backend="classical", step_down=""))
    session = LiveSession(
        settings,
        simulate=True,
        engine=_Cpu(registry.create("classical"), delay_ms=0.0),
        max_frames=60,
        background_build=start_job,
        background_backend="classical",
    )
    with session:
        for _ in range(200):
            if session.stats().frames_processed >= 5:
                break
            time.sleep(0.02)
        assert session.stats().engine_label.startswith("cpu-stand-in")
        assert "building" in session.build_status
        release.set()
        sim = session.simulator
        assert sim is not None
        assert sim.done.wait(10)
        time.sleep(0.2)
        stats = session.stats()
    assert any("built in the background" in c for c in stats.engine_changes), stats.engine_changes
    assert stats.engine_label.startswith("classical")
    assert "ready" in session.build_status


def test_auto_engine_without_a_usable_model_falls_back_to_classical(tmp_path: Path) -> None:
    """A tampered/missing model must not take the live picture down: 'auto' shows the baseline and says why."""
    settings = Settings(
        simulator=SIM,
        engine=EngineSettings(backend="auto", model=str(tmp_path / "missing.onnx"), step_down=""),
    )
    with LiveSession(settings, simulate=True, max_frames=10) as session:
        sim = session.simulator
        assert sim is not None
        assert sim.done.wait(10)
        stats = session.stats()
    assert stats.engine_label.startswith("classical")
    assert "AI model unavailable" in stats.last_error


def test_named_engine_that_cannot_load_fails_with_its_reason(tmp_path: Path) -> None:
    from engines.base import EngineError

    settings = Settings(
        simulator=SIM, engine=EngineSettings(backend="onnxruntime", model=str(tmp_path / "x.onnx"))
    )
    session = LiveSession(settings, simulate=True, max_frames=10)
    with pytest.raises(EngineError, match=r"x\.onnx"):
        session.start()
    session.stop()


def test_live_source_budget_is_one_measured_frame_interval() -> None:
    """A live (non-simulated) source at 15 fps: the default budget becomes ~66.7 ms once its rate is known."""
    from guidance.config import StreamSettings
    from guidance.simulator import SimulatedScanner

    scanner = SimulatedScanner(fps=15.0, width=96, height=96, max_frames=45)
    scanner.start()
    try:
        settings = Settings(
            stream=StreamSettings(port=scanner.port), engine=EngineSettings(backend="classical", step_down="")
        )
        with LiveSession(settings, simulate=False) as session:
            assert session.budget_ms == pytest.approx(1000 / 30)  # before any frame: the 30 fps assumption
            assert scanner.done.wait(10)
            time.sleep(0.2)
            budget = session.budget_ms
    finally:
        scanner.stop()
    assert budget == pytest.approx(1000 / 15, rel=0.1)
