"""A live session: source (simulated scanner or a real peer) -> client -> pipeline, with one lifecycle.

This is what the UI displays and what ``guidance bench pipeline`` measures: the same object, so the bench
measures the product, not a test double.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engines import registry
from engines.backends.tensorrt_backend import BuildJob, BuildStatus
from engines.base import EngineError, SegmentationEngine
from guidance.config import Settings
from guidance.dicom.from_recording import LABELS_ENCODING
from guidance.latency import LatencyMonitor, RateMeter
from guidance.pipeline import LATENCY_NAMES, InferenceWorker, default_budget_ms
from guidance.recorder import Recorder, RecorderStats
from guidance.result_sender import ResultSender
from guidance.results import GuidanceResult
from guidance.simulator import SimulatedScanner
from guidance.slots import LatestSlot
from streaming.frame import Frame
from streaming.igtl import ConnectionEvent, IGTLClient

logger = logging.getLogger(__name__)

#: Frames after which a live source's measured rate sets the default budget (one frame interval).
BUDGET_FROM_RATE_AFTER = 30


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """A consistent-enough snapshot for the UI and reports (each counter is read once)."""

    input_fps: float
    processed_fps: float
    frames_received: int
    frames_processed: int
    frames_skipped: int  # frames the AI never saw because a newer one arrived first
    over_budget: int  # results that arrived later than the budget
    stale_paints: int  # frames painted with a result older than the budget
    engine_errors: int
    budget_ms: float
    engine_label: str
    connection: str
    last_error: str
    source: str
    engine_changes: tuple[str, ...] = ()
    engine_model: str = ""  # the model card's name and version (or the classical method) the engine runs
    engine_note: str = ""  # background build progress, or the latest step-down/swap
    latency: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: MappingProxyType({}))
    last_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


class LiveSession:
    """Owns the client, the inference worker, the slots and (optionally) the simulated scanner.

    Lifecycle: ``start()`` loads and warms the engine, starts the simulator (if any), the worker and the
    client; ``stop()`` stops them in reverse order within a bounded time. Nothing happens in ``__init__``
    beyond wiring.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        simulate: bool = True,
        engine: SegmentationEngine | None = None,
        max_frames: int | None = None,
        background_build: Callable[[], BuildJob] | None = None,  # returns a *started* job
        background_backend: str = "tensorrt",
        result_sinks: tuple[Callable[[GuidanceResult], None], ...] = (),
    ) -> None:
        self.settings = settings
        self._extra_sinks = result_sinks  # e.g. the benchmark's per-result time series
        self.simulate = simulate
        self.display: LatestSlot[Frame] = LatestSlot()  # newest frame, for the painter (peeked)
        self.frames: LatestSlot[Frame] = LatestSlot()  # newest frame, for the AI (taken)
        self.results: LatestSlot[GuidanceResult] = LatestSlot()
        self.monitor = LatencyMonitor(LATENCY_NAMES)
        self.input_rate = RateMeter(30)
        self.synchronised = settings.engine.synchronised
        self._engine = engine
        self._max_frames = max_frames
        self.simulator: SimulatedScanner | None = None
        self.client: IGTLClient | None = None
        self.worker: InferenceWorker | None = None
        self.recorder: Recorder | None = None
        self._recording_since_ns = 0
        self._engine_warning = ""  # persists (unlike connection errors, which clear on reconnect)
        # An accelerated engine built in the background (TensorRT) while a CPU engine serves frames.
        self._build_factory = background_build
        self._build_backend = background_backend
        self.build_job: BuildJob | None = None
        self.build_status = ""
        self._build_lock = threading.Lock()
        self._built_engine: SegmentationEngine | None = None
        self._connection = "idle"
        self._last_error = ""
        self._stale_paints = 0
        self._received = 0
        # Set on each (re)connect, consumed by the next frame (both on the receiver thread): the worker
        # starts a new stream there (a reconnected peer, a restarted replay: not the previous frame's stream).
        self._stream_restarted = False
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._started:
            raise RuntimeError("session already started")
        s = self.settings
        engine = self._engine
        if engine is None:
            engine = self._initial_engine()
        try:
            engine.load()
        except EngineError as exc:
            if self._engine is not None or s.engine.backend != "auto":
                raise  # the user named this engine: say why it cannot run instead of silently replacing it
            # "auto" with no usable model (missing or tampered asset): keep the picture live on the
            # classical baseline and say so in plain words.
            logger.warning("AI engine unavailable (%s); using the classical baseline", exc)
            self._engine_warning = f"AI model unavailable, showing the classical baseline: {exc}"
            engine = registry.create("classical")
            engine.load()
        engine.warm_up()
        self._engine = engine
        fps = s.simulator.fps if self.simulate else 30.0
        budget = s.engine.budget_ms or default_budget_ms(fps)
        host, port = s.stream.host, s.stream.port
        if self.simulate:
            sim = s.simulator
            self.simulator = SimulatedScanner(
                modality=sim.modality,
                fps=sim.fps,
                width=sim.width,
                height=sim.height,
                seed=sim.seed,
                scene=sim.scene,
                max_frames=self._max_frames,
            )
            self.simulator.start()
            host, port = "127.0.0.1", self.simulator.port
        self.client = IGTLClient(
            host,
            port,
            on_frame=self._on_frame,
            on_state=self._on_state,
            device_filter=s.stream.device_filter,
            backoff_initial_s=s.stream.reconnect_initial_s,
            backoff_max_s=s.stream.reconnect_max_s,
            max_body_bytes=s.stream.max_body_mb * 1024 * 1024,
        )
        sinks = (
            self._record_result,
            *((ResultSender(self.client),) if s.stream.send_results else ()),
            *self._extra_sinks,
        )
        self.worker = InferenceWorker(
            engine,
            self.frames,
            self.results,
            self.monitor,
            budget_ms=budget,
            sinks=sinks,
            fallbacks=self._fallbacks(engine),
        )
        self.worker.start()
        self._start_background_build()
        self.client.start()
        self._started = True
        logger.info(
            "Session started: %s, engine %s, budget %.1f ms", self.source, self.worker.engine_label, budget
        )

    def _engine_options(self) -> dict[str, Any]:
        return {"model": self.settings.engine.model} if self.settings.engine.model else {}

    def _initial_engine(self) -> SegmentationEngine:
        """The engine to start with. A TensorRT engine may need minutes to build on first use: then the
        session starts on the best CPU backend and swaps TensorRT in when the background build is ready."""
        name = registry.resolve(self.settings.engine.backend)
        if name != "tensorrt":
            return registry.create(name, **self._engine_options())
        from engines.backends.tensorrt_backend import start_background_build

        model = self.settings.engine.model or None
        self._build_factory = lambda: start_background_build(model)
        cpu = (
            "onnxruntime"
            if any(b.name == "onnxruntime" and b.available for b in registry.backends())
            else "classical"
        )
        logger.info("TensorRT engine will be built in the background; serving with %s meanwhile", cpu)
        return registry.create(cpu, **self._engine_options())

    def _start_background_build(self) -> None:
        if self._build_factory is None:
            return
        try:
            job = self._build_factory()
        except EngineError as exc:
            self.build_status = f"accelerated engine unavailable: {exc}"
            self._last_error = self.build_status
            return
        self.build_job = job
        job.subscribe(self._on_build_status)
        # The job is already running: report where it is now (it may even have finished, e.g. when the
        # engine was in the cache); later changes arrive through the subscription.
        self._on_build_status(job.status())

    def _on_build_status(self, status: BuildStatus) -> None:
        """Runs on the build thread: report progress; when ready, load the engine and hand it over."""
        if status.state == "building":
            self.build_status = f"building {self._build_backend} engine: {status.phase} {status.progress:.0%}"
            return
        if status.state == "failed":
            self.build_status = (
                f"{self._build_backend} build failed, staying on the CPU engine: {status.message}"
            )
            self._last_error = self.build_status
            return
        if status.state != "ready":
            self.build_status = f"{self._build_backend} build {status.state}"
            return
        with self._build_lock:
            if self._built_engine is not None:  # ready reported twice
                return
            try:
                engine = registry.create(self._build_backend, **self._engine_options())
                engine.load()
                engine.warm_up()
            except EngineError as exc:
                self.build_status = f"{self._build_backend} engine could not be loaded: {exc}"
                self._last_error = self.build_status
                return
            self._built_engine = engine
        self.build_status = f"{self._build_backend} engine ready ({status.precision or 'default precision'})"
        if self.worker is not None:
            self.worker.swap_engine(engine, f"{self._build_backend} engine built in the background")
        else:  # the session stopped meanwhile
            engine.close()

    def _fallbacks(self, primary: SegmentationEngine) -> tuple[SegmentationEngine, ...]:
        """Load the step-down engines named in the settings (skipping the primary's own backend)."""
        out = []
        for name in (n.strip() for n in self.settings.engine.step_down.split(",")):
            if not name or name == primary.describe().backend:
                continue
            try:
                fb = registry.create(name)
                fb.load()
                fb.warm_up()
            except EngineError as exc:
                logger.warning("Step-down engine %s unavailable: %s", name, exc)
                continue
            out.append(fb)
        return tuple(out)

    def stop(self) -> None:
        if not self._started:
            return
        self.stop_recording()
        if self.build_job is not None:
            self.build_job.stop()
        if self.client is not None:
            self.client.stop()
        if self.simulator is not None:
            self.simulator.stop()
        if self.worker is not None:
            self.worker.stop()  # closes the engines it owns
        elif self._engine is not None:
            self._engine.close()
        self._started = False
        self._connection = "stopped"

    def __enter__(self) -> LiveSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ recording
    def start_recording(self, path: Path, metadata: Mapping[str, Any] | None = None) -> Recorder:
        """Record the original OpenIGTLink messages from now on (crash-safe container, own thread).

        Raises :class:`~streaming.recording.RecordingError` with a readable reason when the file cannot be
        created; the live session goes on either way.
        """
        if self.client is None:
            raise RuntimeError("start the session before recording")
        if self.recorder is not None:
            raise RuntimeError(f"already recording to {self.recorder.path}")
        meta = {
            "source": self.source,
            "engine": self.worker.engine_label if self.worker else "",
            "model": self.worker.engine_model if self.worker else "",
            **(metadata or {}),
        }
        recorder = Recorder(path, meta, on_error=self.report_error)
        recorder.start()
        self.recorder = recorder
        self.client.set_on_raw(recorder.submit)
        # After set_on_raw: every frame received from now on is in the file, so its result may be too.
        self._recording_since_ns = time.perf_counter_ns()
        logger.info("Recording to %s", path)
        return recorder

    def stop_recording(self) -> RecorderStats | None:
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return None
        if self.client is not None:
            self.client.set_on_raw(None)
        stats = recorder.stop()
        logger.info("Recording stopped: %d messages, %d dropped", stats.written, stats.dropped)
        return stats

    def _record_result(self, result: GuidanceResult) -> None:
        """Worker-side sink: while recording, store each result's label map beside its frame (for the
        DICOM SEG). Keyed by the frame's receive time, which the recorder stores with the frame too."""
        recorder = self.recorder
        if recorder is not None and result.frame.receive_ns >= self._recording_since_ns:
            payload = zlib.compress(result.labels.tobytes(), 1)  # level 1: ~0.2 ms at 256x256, 50x smaller
            recorder.submit_result(result.seq, result.frame.receive_ns, payload, LABELS_ENCODING)

    @property
    def recording_path(self) -> Path | None:
        recorder = self.recorder
        return recorder.path if recorder is not None else None

    def add_marker(self, label: str) -> bool:
        """Add a marker to the running recording; False when nothing is being recorded."""
        if self.recorder is None:
            return False
        self.recorder.add_marker(label)
        return True

    # ------------------------------------------------------------------ receiver thread callbacks
    def _on_frame(self, frame: Frame) -> None:
        # Runs on the receiver thread: two reference stores, counters and one histogram bucket.
        if self._stream_restarted:
            self._stream_restarted = False
            if self.worker is not None:
                self.worker.start_stream(frame.seq)  # before the frame can reach the worker
        self.display.put(frame)
        self.frames.put(frame)
        self._received += 1
        self.input_rate.tick(frame.receive_ns)
        if frame.sender_time_ns:
            self.monitor.record_ns("sent_to_received", frame.receive_wall_ns - frame.sender_time_ns)
        if self._received == BUDGET_FROM_RATE_AFTER:
            self._budget_from_source_rate()

    def _budget_from_source_rate(self) -> None:
        """A live source's frame rate is known only once frames arrive: unless the user set a budget, make
        it one measured frame interval of the source (the simulator's rate is known from the start)."""
        worker = self.worker
        rate = self.input_rate.rate()
        if self.simulate or self.settings.engine.budget_ms or worker is None or rate <= 0:
            return
        worker.budget_ms = default_budget_ms(rate)
        logger.info("Latency budget set to %.1f ms from the source's %.1f fps", worker.budget_ms, rate)

    def _on_state(self, event: ConnectionEvent) -> None:
        self._connection = event.state
        if event.state == "disconnected" and event.reason:
            self._last_error = f"connection lost: {event.reason}"
        elif event.state == "connected":
            self._last_error = ""
            self._stream_restarted = True

    # ------------------------------------------------------------------ for the painter (GUI thread)
    def latest_frame(self) -> Frame | None:
        return self.display.peek()

    def latest_result(self) -> GuidanceResult | None:
        return self.results.peek()

    def mark_painted(self, frame_seq: int, now_ns: int | None = None, *, stale: bool = False) -> None:
        """Record display latency for a painted frame. ``stale``: the painter drew its overlay as stale
        (it decided with :func:`guidance.results.overlay_is_stale` on what it actually painted; the session
        does not re-derive it from the slots, which may already hold newer items)."""
        now = time.perf_counter_ns() if now_ns is None else now_ns
        frame = self.display.peek()
        if frame is not None and frame.seq == frame_seq:
            self.monitor.record_ns("receive_to_paint", now - frame.receive_ns)
        result = self.results.peek()
        if result is not None and result.seq == frame_seq:
            self.monitor.record_ns("result_to_paint", now - result.times.published)
        self._stale_paints += stale

    @property
    def source(self) -> str:
        if self.simulate:
            return f"simulated {self.settings.simulator.modality} ({self.settings.simulator.fps:g} fps)"
        return f"{self.settings.stream.host}:{self.settings.stream.port}"

    @property
    def budget_ms(self) -> float:
        return self.worker.budget_ms if self.worker else 0.0

    def report_error(self, message: str) -> None:
        self._last_error = message

    def stats(self) -> PipelineStats:
        now = time.perf_counter_ns()
        w = self.worker
        c = w.counters() if w else None
        summary = self.monitor.summary()
        last: dict[str, float] = {}
        result = self.results.peek()
        if result is not None:
            t = result.times
            last = {
                "queue": t.queue_ms,
                "infer": t.infer_ms,
                "interpret": t.interpret_ms,
                "receive_to_result": t.receive_to_result_ms,
                "age": result.age_ms(now),
            }
        client_err = self.client.stats.last_error if self.client else ""
        return PipelineStats(
            input_fps=self.input_rate.rate(now),
            processed_fps=w.rate.rate(now) if w else 0.0,
            frames_received=self._received,
            frames_processed=c.processed if c else 0,
            frames_skipped=c.skipped if c else 0,
            over_budget=c.over_budget if c else 0,
            stale_paints=self._stale_paints,
            engine_errors=c.errors if c else 0,
            budget_ms=self.budget_ms,
            engine_label=w.engine_label if w else "",
            connection=self._connection,
            last_error=(c.last_error if c and c.last_error else "")
            or self._last_error
            or self._engine_warning
            or client_err,
            source=self.source,
            engine_changes=c.engine_changes if c else (),
            engine_model=w.engine_model if w else "",
            engine_note=self.build_status
            or self._engine_warning
            or (c.engine_changes[-1] if c and c.engine_changes else ""),
            latency=MappingProxyType({k: MappingProxyType(v) for k, v in summary.items()}),
            last_ms=MappingProxyType(last),
        )
