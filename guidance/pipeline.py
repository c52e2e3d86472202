"""The live pipeline: newest frame -> engine -> interpretation -> newest result, under a latency budget.

One inference worker is the single consumer of the frame slot. It always takes the newest frame, so a slow
engine makes it skip frames (counted) instead of building a backlog; the display never waits for it because
the UI paints the newest *frame* on its own and draws the newest *result* with its age.

Successive frames the worker processes are one stream to the engine (a temporal model subtracts the
previous frame; an alternating-view model fuses the target, and possibly the instrument, with the previous
frame's, seen mirrored) and to the interpreter (the tip filter). The worker starts a new stream, resetting
both, before the first frame of a new connection (:meth:`InferenceWorker.start_stream`, called by the session on
every (re)connect: a restarted replay, a scanner that came back), when the OpenIGTLink device name changes
(another stream on the same connection) and after a gap of ``stream_gap_s`` without frames (a paused or
frozen source: the last frame is no longer the previous one). A change of frame size or pixel type resets the
engine's previous frame by itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engines.base import SegmentationEngine
from guidance.interpretation import Interpreter
from guidance.latency import LatencyMonitor, RateMeter, StageTimes
from guidance.results import GuidanceResult
from guidance.slots import LatestSlot, SlotClosed
from streaming.frame import Frame

logger = logging.getLogger(__name__)

#: Histogram names recorded by the pipeline (milliseconds).
LATENCY_NAMES = (
    "sent_to_received",  # sender wall stamp -> last byte received (same-host clocks)
    "queue",  # received -> inference start (time waiting in the slot)
    "infer",
    "interpret",
    "receive_to_result",
    "sent_to_result",
    "result_to_paint",
    "receive_to_paint",
)


#: Seconds without frames after which the next frame starts a new stream (its predecessor is too old to be
#: "the previous frame" of a temporal model).
STREAM_GAP_S = 1.0


def _describe(engine: SegmentationEngine) -> tuple[str, str]:
    """``(label, model)`` of an engine, from one ``describe()``."""
    info = engine.describe()
    return info.label(), info.model


@dataclass(frozen=True, slots=True)
class WorkerCounters:
    processed: int
    skipped: int  # frames overwritten in the slot before the worker took them
    over_budget: int  # results whose receive->result exceeded the budget
    errors: int
    last_error: str
    engine_changes: tuple[str, ...]  # human-readable log of step-downs and swaps


@dataclass(frozen=True, slots=True)
class StepDownPolicy:
    """When to give up on the current engine for the next (faster) fallback.

    Decided on processing time (inference + interpretation), not on receive->result: the time a frame
    waits in the slot depends on when it arrived relative to the worker, not on the engine.
    """

    # ~2 s at 30 fps: a passing load spike (another process, a GC pause) must not downgrade the engine for
    # the rest of the session; only sustained overload does.
    window: int = 60  # results considered
    over_fraction: float = 0.8  # step down when this fraction of the window ran over budget


class InferenceWorker:
    """Single consumer of ``frames``; publishes :class:`GuidanceResult` into ``results``.

    Owns its engines: the current one, the fallbacks it may step down to when the current one keeps
    missing the budget, and any engine handed over with :meth:`swap_engine` (e.g. a TensorRT engine that
    finished building in the background while the CPU engine kept serving). It closes them on ``stop``.
    """

    def __init__(
        self,
        engine: SegmentationEngine,
        frames: LatestSlot[Frame],
        results: LatestSlot[GuidanceResult],
        monitor: LatencyMonitor,
        *,
        budget_ms: float,
        interpreter: Interpreter | None = None,
        sinks: tuple[Callable[[GuidanceResult], None], ...] = (),
        fallbacks: tuple[SegmentationEngine, ...] = (),
        step_down: StepDownPolicy | None = StepDownPolicy(),
        name: str = "guidance-inference",
        stream_gap_s: float = STREAM_GAP_S,
    ) -> None:
        self.engine = engine
        self._fallbacks = list(fallbacks)
        self._policy = step_down
        self._recent_over: list[bool] = []
        self._pending: SegmentationEngine | None = None
        self._swap_lock = threading.Lock()
        self._retired: list[SegmentationEngine] = []
        self._changes: list[str] = []
        self._frames = frames
        self._results = results
        self._monitor = monitor
        self.budget_ms = budget_ms
        self._interpreter = interpreter or Interpreter()
        self._name = name
        # Called on the worker after each result is published (send back to Slicer, record...): they run
        # after the display has the result, so they never delay it. Errors are logged and counted.
        self.sinks = sinks
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._processed = 0
        self._over_budget = 0
        self._errors = 0
        self._last_error = ""
        self._last_dropped = 0
        self.rate = RateMeter(30)
        self._engine_label, self._engine_model = _describe(engine)
        # Stream boundaries (see the module docstring). _stream_start is written by the receiver thread (one
        # int store), the rest only by the worker.
        self._stream_gap_ns = int(stream_gap_s * 1e9)
        self._stream_start = 0
        self._applied_start = -1
        self._last_device: str | None = None
        self._last_receive_ns = 0

    @property
    def engine_label(self) -> str:
        return self._engine_label

    @property
    def engine_model(self) -> str:
        """What the engine runs (a model card's name and version, or the classical method)."""
        return self._engine_model

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._stopping.clear()
        self._frames.reopen()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the frame slot (wakes the worker) and join. An inference in flight finishes first."""
        self._stopping.set()
        self._frames.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("inference worker did not stop within %.1f s (engine stuck?)", timeout)
            self._thread = None
        for engine in (
            self.engine,
            *self._fallbacks,
            *self._retired,
            *([self._pending] if self._pending else []),
        ):
            try:
                engine.close()
            except Exception:  # closing must not hide the others
                logger.exception("Closing engine %s failed", engine.name)
        self._fallbacks.clear()
        self._retired.clear()
        self._pending = None

    def swap_engine(self, engine: SegmentationEngine, reason: str) -> None:
        """Hand over a loaded, warmed-up engine; the worker switches before its next inference."""
        with self._swap_lock:
            if self._pending is not None:
                self._retired.append(self._pending)
            self._pending = engine
        self._changes.append(f"switching to {engine.describe().label()}: {reason}")
        logger.info("Engine swap requested: %s (%s)", engine.describe().label(), reason)

    def start_stream(self, first_seq: int) -> None:
        """Frames from ``first_seq`` on belong to a new stream; the worker resets the engine's and the
        interpreter's temporal state before the first of them it processes (older frames still waiting in
        the slot are processed as the end of the old stream). Any thread; frame ``seq`` must not decrease."""
        self._stream_start = first_seq

    def _new_stream(self, frame: Frame) -> bool:
        """Whether ``frame`` starts a new stream (worker thread); records it as the stream's last frame."""
        start = self._stream_start
        new = frame.device != self._last_device or (
            frame.receive_ns - self._last_receive_ns > self._stream_gap_ns
        )
        if start != self._applied_start and frame.seq >= start:
            self._applied_start = start
            new = True
        self._last_device = frame.device
        self._last_receive_ns = frame.receive_ns
        return new

    def counters(self) -> WorkerCounters:
        return WorkerCounters(
            self._processed,
            self._frames.dropped,
            self._over_budget,
            self._errors,
            self._last_error,
            tuple(self._changes),
        )

    def _use(self, engine: SegmentationEngine) -> None:
        self._retired.append(self.engine)
        self.engine = engine
        self._engine_label, self._engine_model = _describe(engine)
        self._recent_over.clear()

    def _maybe_step_down(self, processing_ms: float) -> None:
        policy = self._policy
        if policy is None or not self._fallbacks:
            return
        self._recent_over.append(processing_ms > self.budget_ms)
        if len(self._recent_over) > policy.window:
            del self._recent_over[0]
        if (
            len(self._recent_over) == policy.window
            and sum(self._recent_over) >= policy.over_fraction * policy.window
        ):
            old = self._engine_label
            self._use(self._fallbacks.pop(0))
            msg = f"stepped down from {old} to {self._engine_label}: over the {self.budget_ms:.1f} ms budget"
            self._changes.append(msg)
            logger.warning("%s", msg)

    def _run(self) -> None:
        rec = self._monitor.record_ns
        while not self._stopping.is_set():
            try:
                frame = self._frames.take()
            except SlotClosed:
                return
            if frame is None:  # pragma: no cover - take() without timeout never returns None
                continue
            if self._pending is not None:  # unlocked read of one reference: cheap, and rarely true
                with self._swap_lock:
                    pending, self._pending = self._pending, None
                if pending is not None:
                    self._use(pending)
            dropped = self._frames.dropped
            skipped, self._last_dropped = dropped - self._last_dropped, dropped
            new_stream = self._new_stream(frame)
            t_start = time.perf_counter_ns()
            try:
                if new_stream:
                    self.engine.reset()
                    self._interpreter.reset()
                out = self.engine.infer(frame.pixels)
                t_infer = time.perf_counter_ns()
                interp = self._interpreter.update(
                    out.labels, frame.spacing_mm, frame.receive_ns / 1e9, out.instrument_prob
                )
            except Exception as exc:  # the engine must not take the live display down
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("Inference failed on frame %d", frame.seq)
                continue
            t_interp = time.perf_counter_ns()
            over = (t_interp - frame.receive_ns) / 1e6 > self.budget_ms
            self._over_budget += over
            times = StageTimes(
                received=frame.receive_ns,
                infer_start=t_start,
                infer_end=t_infer,
                interpreted=t_interp,
                published=time.perf_counter_ns(),
            )
            result = GuidanceResult(
                frame=frame,
                labels=out.labels,
                interpretation=interp,
                times=times,
                engine=self._engine_label,
                budget_ms=self.budget_ms,
                skipped_before=skipped,
                over_budget=over,
            )
            self._results.put(result)
            self._processed += 1
            self._maybe_step_down((t_interp - t_start) / 1e6)
            for sink in self.sinks:
                try:
                    sink(result)
                except Exception as exc:  # a sink must not stop the AI
                    self._errors += 1
                    self._last_error = f"result sink failed: {exc}"
                    logger.exception("Result sink %r failed", sink)
            self.rate.tick(times.published)
            rec("queue", t_start - frame.receive_ns)
            rec("infer", t_infer - t_start)
            rec("interpret", t_interp - t_infer)
            rec("receive_to_result", times.published - frame.receive_ns)
            if frame.sender_time_ns:
                # Same-host wall clocks: the result's wall time is its receive wall time plus the monotonic
                # interval, so one time.time_ns() call per frame is enough and immune to NTP steps mid-frame.
                rec(
                    "sent_to_result",
                    frame.receive_wall_ns - frame.sender_time_ns + times.published - frame.receive_ns,
                )


def default_budget_ms(fps: float) -> float:
    """One frame interval of the source (the issue's default budget)."""
    return 1000.0 / fps if fps > 0 and math.isfinite(fps) else 1000.0 / 30.0
