"""TensorRT backend (NVIDIA GPUs), written against the TensorRT 10.x and 11.x Python API.

Install (NVIDIA machine; the TensorRT libraries come from NVIDIA's own package index, which the
``tensorrt`` wheel reaches at install time)::

    pip install 'guidance[gpu]'            # = tensorrt>=10, cuda-python>=12 (cuda-bindings), onnx
    pip install onnxconverter-common        # FP16 ONNX variant for strongly typed networks

Design:

* **Precision without builder flags.** TensorRT 11 removed ``BuilderFlag.FP16`` and networks are strongly
  typed, so the precision is the ONNX file's: for FP16 an FP16 variant of the model (FP16 weights and
  activations, FP32 inputs/outputs, argmax/softmax kept in FP32) is made with
  :func:`convert_to_fp16` and parsed with the ``STRONGLY_TYPED`` network flag (also used on TRT 10, so
  both versions take one code path).
* **Golden check.** After every build the engine runs the golden frame and its output is compared with
  FP32 ONNX Runtime on the CPU (:func:`compare_outputs`); an FP16 engine that disagrees is discarded and
  the FP32 one is built instead (:func:`choose_precision`).
* **Caches.** Engine files keyed by GPU name, compute capability, TensorRT version, input shape, precision
  and model sha256; a timing cache per GPU + TensorRT version (:mod:`engines.trt_cache`), all written
  atomically. ``deserialize_cuda_engine`` returning None means rebuild.
* **Background build.** :class:`BuildJob` builds on a ``guidance-trt-build`` thread, reports progress
  through an ``IProgressMonitor`` subclass (phase, step/steps), can be cancelled (the monitor returns False)
  and exposes :meth:`BuildJob.status` so the pipeline keeps serving on the CPU backend and switches to
  ``tensorrt`` when the status says ``ready``.
* **Runtime.** ``execute_async_v3`` on a non-default CUDA stream, tensor addresses set once, pinned host
  buffers (the preprocessor writes the input straight into pinned memory), optional CUDA-graph capture
  after one warm-up enqueue (recaptured when an address or shape changes); CUDA through ``cuda-bindings``
  (``from cuda.bindings import runtime``), not PyCUDA.
* **Alternating-view models** (:mod:`engines.views`). The view flag and the weight are pinned host
  inputs copied with the frame; the previous log-odds (the target's, and the instrument's where the card
  fuses it) never leave the GPU: after each run each state output is copied device to device into its
  state input, inside the captured graph. The fusion after those FP32 inputs stays FP32 in the FP16
  variant.

What could not run on the development machines (no GPU, TensorRT not installable there): the builder,
runtime, CUDA-graph and progress-monitor code paths, the alternating-view state handling among them.
Everything around them is tested on the CPU: cache keys and invalidation, precision choice, the
golden-check decision with fake outputs, the FP16 conversion (checked with ONNX Runtime, for an
alternating-view graph too), the background-build lifecycle with a fake build, and the probe messages.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.assets import ModelCard, load_model_card, resolve_model
from engines.backends.onnxruntime_backend import LABELS, PROB, add_label_outputs, logits_output
from engines.base import (
    PRESENCE,
    EngineError,
    EngineInfo,
    EngineUnavailable,
    SegmentationOutput,
    presence_scores,
)
from engines.preprocess import Geometry, Preprocessor
from engines.registry import BackendSpec, register
from engines.trt_cache import EngineCache, EngineKey, load_or_invalidate
from engines.views import (
    INSTRUMENT_LOG_ODDS,
    PREVIOUS_INSTRUMENT,
    PREVIOUS_TARGET,
    PREVIOUS_WEIGHT,
    TARGET_LOG_ODDS,
    VIEW_MIRRORED,
    FusionState,
)

logger = logging.getLogger(__name__)

NAME = "tensorrt"
INSTALL_HINT = "tensorrt is not installed (pip install 'guidance[gpu]'; needs an NVIDIA GPU and driver)"
NO_GPU = "no NVIDIA GPU/driver"
CUDA_BINDINGS_HINT = "cuda-bindings is not installed (pip install cuda-python)"
#: An FP16 engine must agree with FP32 ONNX Runtime this well on the golden frame.
MIN_LABEL_AGREEMENT = 0.995
MAX_PROB_DIFF = 0.05


# ---------------------------------------------------------------------------------------------- probe
def nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version")


def probe(
    find_spec: Callable[[str], Any] = importlib.util.find_spec,
    driver_present: Callable[[], bool] = nvidia_driver_present,
) -> str | None:
    """None when TensorRT can run here, else a one-line reason (imports nothing heavy)."""
    if find_spec("tensorrt") is None:
        return INSTALL_HINT
    if not driver_present():
        return NO_GPU
    if find_spec("cuda") is None or find_spec("cuda.bindings") is None:
        return CUDA_BINDINGS_HINT
    return None


# ---------------------------------------------------------------------------------------------- FP16
def nodes_downstream(model: Any, tensor: str) -> list[str]:
    """Names of the nodes that (transitively) consume ``tensor``; unnamed nodes get a name first."""
    frontier = {tensor}
    names: list[str] = []
    for k, node in enumerate(model.graph.node):  # ONNX graphs are topologically sorted
        if not node.name:
            node.name = f"_node{k}_{node.op_type}"
        if any(i in frontier for i in node.input):
            names.append(node.name)
            frontier.update(node.output)
    return names


def detach_consumed_outputs(model: Any) -> Any:
    """Give every graph output that nodes inside the graph also consume its own Identity node.

    A running target's state output (``target_log_odds``) is also the tensor its fused logits are built
    from. onnxconverter-common casts such an output to FP16 in place and back to FP32 after it, so the
    FP32 fusion downstream then met an FP16 tensor (an ONNX type error, found on ONNX Runtime). With the
    Identity the output is a tensor of its own, and the inside keeps the FP32 one."""
    outputs = {o.name for o in model.graph.output}
    consumed = {i for n in model.graph.node for i in n.input} & outputs
    if not consumed:
        return model
    from onnx import helper

    for name in sorted(consumed):
        inner = f"{name}_inner"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}_output"))
    return model


def convert_to_fp16(model: Any, head_from: str | None = None, fp32_from: Sequence[str] = ()) -> Any:
    """FP16 variant of an ``onnx.ModelProto``: FP16 weights/activations, FP32 I/O, argmax/softmax in FP32.

    For strongly typed TensorRT networks (TRT 11 has no FP16 builder flag). Uses onnxconverter-common,
    which also keeps the inputs that must stay float (Resize scales) in FP32. ``head_from`` (the logits
    tensor) keeps every node after it in FP32: the label decision and the instrument probability, whether
    written as ArgMax/Softmax or, as the shipped export does, as plane-wise Greater/Where/Exp.
    ``fp32_from`` (graph inputs) keeps every node after each of them in FP32 too: the fusion of an
    alternating-view model with its FP32 state inputs (mixing an FP16 tensor with one of them in one
    node is a type error).
    """
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise EngineUnavailable(
            f"FP16 conversion needs onnxconverter-common (pip install onnxconverter-common): {exc}"
        ) from exc
    block = [*float16.DEFAULT_OP_BLOCK_LIST, "ArgMax", "Softmax"]
    head = nodes_downstream(model, head_from) if head_from else []
    for name in fp32_from:
        head += [n for n in nodes_downstream(model, name) if n not in head]
    return float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=block, node_block_list=head
    )


def model_for_precision(card: ModelCard, precision: str) -> bytes:
    """The ONNX bytes TensorRT parses for ``precision``: int32 labels + probability outputs in-graph."""
    import onnx

    model = onnx.load(str(card.onnx_path))
    logits = logits_output(model)
    model, _, _ = add_label_outputs(model, logits, labels_dtype="int32")
    # Expose only labels + probability (+ the presence score of a model with that head): logits stay
    # inside the engine.
    # An alternating-view model also keeps its state output (engines.views), fed back on the device.
    wanted = (f"{LABELS}_int32", LABELS, PROB, PRESENCE, TARGET_LOG_ODDS, INSTRUMENT_LOG_ODDS)
    keep = [o for o in model.graph.output if o.name in wanted]
    if any(o.name == f"{LABELS}_int32" for o in keep):
        keep = [o for o in keep if o.name != LABELS]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    if precision == "fp16":
        fused = (PREVIOUS_TARGET, PREVIOUS_INSTRUMENT, PREVIOUS_WEIGHT)
        state = [i.name for i in model.graph.input if i.name in fused]
        model = convert_to_fp16(detach_consumed_outputs(model), head_from=logits, fp32_from=state)
    elif precision != "fp32":
        raise EngineError(f"unknown TensorRT precision {precision!r}")
    data: bytes = model.SerializeToString()
    return data


# ---------------------------------------------------------------------------------------------- golden
@dataclass(frozen=True, slots=True)
class GoldenVerdict:
    ok: bool
    label_agreement: float
    max_prob_diff: float
    reason: str


def compare_outputs(
    ref_labels: npt.NDArray[np.generic],
    ref_prob: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.generic],
    prob: npt.NDArray[np.floating[Any]],
    *,
    min_label_agreement: float = MIN_LABEL_AGREEMENT,
    max_prob_diff: float = MAX_PROB_DIFF,
) -> GoldenVerdict:
    """Does an engine's output on the golden frame agree with the FP32 ONNX Runtime reference?"""
    if ref_labels.shape != labels.shape or ref_prob.shape != prob.shape:
        return GoldenVerdict(
            False, 0.0, float("inf"), f"shape {labels.shape} differs from reference {ref_labels.shape}"
        )
    p = np.asarray(prob, dtype=np.float32)
    if not np.isfinite(p).all():
        return GoldenVerdict(False, 0.0, float("inf"), "engine output has NaN/Inf")
    agreement = float((np.asarray(ref_labels).astype(np.int64) == np.asarray(labels).astype(np.int64)).mean())
    diff = float(np.abs(np.asarray(ref_prob, dtype=np.float32) - p).max()) if p.size else 0.0
    if agreement < min_label_agreement:
        return GoldenVerdict(
            False, agreement, diff, f"labels agree on {agreement:.2%} < {min_label_agreement:.2%}"
        )
    if diff > max_prob_diff:
        return GoldenVerdict(
            False, agreement, diff, f"probability differs by {diff:.3f} > {max_prob_diff:.3f}"
        )
    return GoldenVerdict(True, agreement, diff, "ok")


def choose_precision(
    build: Callable[[str], Any],
    check: Callable[[Any], GoldenVerdict],
    precisions: Sequence[str] = ("fp16", "fp32"),
) -> tuple[str, Any, GoldenVerdict]:
    """Build each precision in order until one passes the golden check.

    Returns ``(precision, engine, verdict)``.

    Raises EngineError when none passes (the message lists every precision's reason).
    """
    reasons = []
    for precision in precisions:
        engine = build(precision)
        verdict = check(engine)
        if verdict.ok:
            return precision, engine, verdict
        logger.warning(
            "TensorRT %s engine failed the golden check (%s); falling back", precision, verdict.reason
        )
        reasons.append(f"{precision}: {verdict.reason}")
    raise EngineError("no TensorRT engine passed the golden check (" + "; ".join(reasons) + ")")


def golden_frame(card: ModelCard) -> npt.NDArray[np.generic]:
    """The stored golden frame ``<name>.golden.npy`` beside the model, or a deterministic synthetic one."""
    stored = card.onnx_path.with_suffix(".golden.npy")
    if stored.is_file():
        arr: npt.NDArray[np.generic] = np.load(stored, allow_pickle=False)
        return arr
    h, w = card.input_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 60 + 40 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img += 120 * (np.abs((yy - 0.3 * h) - 0.5 * (xx - 0.2 * w)) < 1.5)  # a bright needle
    img -= 50 * (((yy - 0.7 * h) ** 2 + (xx - 0.6 * w) ** 2) < (0.08 * min(h, w)) ** 2)  # a dark target
    out: npt.NDArray[np.uint8] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def reference_outputs(card: ModelCard) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """FP32 ONNX Runtime (CPU) labels and probability at network resolution on the golden frame."""
    from engines.backends.onnxruntime_backend import OnnxRuntimeEngine

    ort_engine = OnnxRuntimeEngine(card.card_path, device="cpu")
    ort_engine.load()
    try:
        ort_engine.preprocessor.prepare(golden_frame(card))
        labels, prob = ort_engine.run_tensor()
        return labels.copy(), prob.copy()
    finally:
        ort_engine.close()


# ---------------------------------------------------------------------------------------------- build job
@dataclass(frozen=True, slots=True)
class BuildStatus:
    """Snapshot of a background build, safe to read from any thread."""

    state: str = "idle"  # "idle" | "building" | "ready" | "failed" | "cancelled"
    phase: str = ""
    progress: float = 0.0  # 0..1 within the current phase
    message: str = ""
    precision: str = ""
    engine_path: str = ""
    started_ns: int = 0
    finished_ns: int = 0

    @property
    def done(self) -> bool:
        return self.state in ("ready", "failed", "cancelled")


class BuildCancelledError(EngineError):
    """The build was cancelled by :meth:`BuildJob.stop`."""


@dataclass(slots=True)
class BuildReporter:
    """Passed to a build function: report progress and check for cancellation."""

    job: BuildJob
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)

    def phase(self, name: str, step: int = 0, steps: int = 0) -> None:
        self.job.update(phase=name, progress=(step / steps) if steps else 0.0)

    @property
    def cancelled(self) -> bool:
        return self.job.cancel_requested


BuildFn = Callable[[BuildReporter], tuple[str, str]]  # -> (precision, engine path)


class BuildJob:
    """Runs ``build_fn`` on a ``guidance-trt-build`` thread with status, progress and cancellation.

    ``stop()`` asks the build to cancel (TensorRT polls the progress monitor between steps, which then
    returns False) and joins within ``timeout``; a TensorRT step itself is not interruptible, so ``stop``
    returns False if the thread is still inside one when the timeout expires.
    """

    def __init__(self, build_fn: BuildFn, name: str = "guidance-trt-build") -> None:
        self._fn = build_fn
        self._name = name
        self._lock = threading.Lock()
        self._status = BuildStatus()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[BuildStatus], None]] = []

    def subscribe(self, callback: Callable[[BuildStatus], None]) -> None:
        """Call ``callback(status)`` on every change (from the build thread)."""
        self._listeners.append(callback)

    def status(self) -> BuildStatus:
        with self._lock:
            return self._status

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def update(self, **changes: Any) -> None:
        """Replace fields of the status snapshot and notify subscribers."""
        with self._lock:
            self._status = replace(self._status, **changes)
            snap = self._status
        for cb in self._listeners:
            cb(snap)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("BuildJob already started")
        self.update(state="building", started_ns=time.perf_counter_ns(), message="")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            precision, path = self._fn(BuildReporter(self))
        except BuildCancelledError:
            self.update(state="cancelled", message="cancelled", finished_ns=time.perf_counter_ns())
        except Exception as exc:  # surfaced through status(), never lost
            logger.exception("TensorRT engine build failed")
            self.update(
                state="failed", message=str(exc) or type(exc).__name__, finished_ns=time.perf_counter_ns()
            )
        else:
            self.update(
                state="ready",
                precision=precision,
                engine_path=path,
                progress=1.0,
                finished_ns=time.perf_counter_ns(),
            )
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> BuildStatus:
        self._done.wait(timeout)
        return self.status()

    def stop(self, timeout: float = 5.0) -> bool:
        """Cancel and join; True when the thread has ended."""
        self._cancel.set()
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()


# ---------------------------------------------------------------------------------------------- TensorRT
def _cudart() -> Any:
    from cuda.bindings import runtime

    return runtime


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-bindings ``(err, *values)`` tuple, raising EngineError on failure."""
    rt = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA {what} failed: {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """``(name, (major, minor))`` of CUDA device 0."""
    rt = _cudart()
    props = _check(rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = (
        props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    )
    return name, (int(props.major), int(props.minor))


def _trt_logger() -> Any:
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _make_progress_monitor(reporter: BuildReporter) -> Any | None:
    """An ``IProgressMonitor`` forwarding phases/steps to ``reporter`` (None on TRT without it)."""
    import tensorrt as trt

    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._steps[phase_name] = num_steps
            reporter.phase(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            reporter.phase(phase_name, step + 1, self._steps.get(phase_name, 0))
            return not reporter.cancelled  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            reporter.phase(phase_name, 1, 1)

    return _Monitor()


def engine_key(card: ModelCard, precision: str) -> EngineKey:
    import tensorrt as trt

    gpu, cc = gpu_identity()
    h, w = card.input_hw
    return EngineKey(
        card.name, card.sha256, gpu, cc, str(trt.__version__), (1, card.channels, h, w), precision
    )


def build_serialized(
    card: ModelCard, precision: str, cache: EngineCache, reporter: BuildReporter | None
) -> bytes:
    """Parse the ONNX variant for ``precision`` into a strongly typed network and build it."""
    import tensorrt as trt

    log = _trt_logger()
    builder = trt.Builder(log)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse(model_for_precision(card, precision)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {card.onnx_path.name} ({precision}): {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    key = engine_key(card, precision)
    timing = config.create_timing_cache(cache.load_timing_cache(key))
    config.set_timing_cache(timing, ignore_mismatch=False)
    if reporter is not None:
        monitor = _make_progress_monitor(reporter)
        if monitor is not None:
            config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if reporter is not None and reporter.cancelled:
        raise BuildCancelledError("TensorRT build cancelled")
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {card.name} ({precision})")
    cache.store_timing_cache(key, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def ensure_engine(
    card: ModelCard,
    cache: EngineCache,
    precisions: Sequence[str] = ("fp16", "fp32"),
    reporter: BuildReporter | None = None,
) -> tuple[str, Path]:
    """``(precision, engine path)`` of a cached or freshly built engine that passed the golden check."""
    import tensorrt as trt

    runtime = trt.Runtime(_trt_logger())
    for precision in precisions:  # a cached engine already passed the golden check when it was stored
        key = engine_key(card, precision)
        if load_or_invalidate(cache, key, runtime.deserialize_cuda_engine) is not None:
            return precision, cache.engine_path(key)
    ref_labels, ref_prob = reference_outputs(card)
    frame = golden_frame(card)

    def build(precision: str) -> tuple[str, bytes]:
        if reporter is not None:
            reporter.phase(f"build {precision}")
        return precision, build_serialized(card, precision, cache, reporter)

    def check(built: tuple[str, bytes]) -> GoldenVerdict:
        _, blob = built
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            return GoldenVerdict(False, 0.0, float("inf"), "freshly built engine does not deserialize")
        runner = _TrtRunner(engine, card, "stretch", use_graph=False)
        try:
            runner.pre.prepare(frame)
            labels, prob = runner.run()
            return compare_outputs(ref_labels, ref_prob, labels, prob)
        finally:
            runner.close()

    precision, (_, blob), verdict = choose_precision(build, check, precisions)
    key = engine_key(card, precision)
    path = cache.store(
        key, blob, {"label_agreement": verdict.label_agreement, "max_prob_diff": verdict.max_prob_diff}
    )
    cache.prune_model(key)
    return precision, path


def start_background_build(
    model: str | Path | None = None,
    cache: EngineCache | None = None,
    precisions: Sequence[str] = ("fp16", "fp32"),
) -> BuildJob:
    """Start building (or finding) the engine on a ``guidance-trt-build`` thread; poll ``job.status()``.

    The pipeline keeps serving with its current (CPU) engine and creates the ``tensorrt`` engine when the
    status is ``ready`` (the engine is then in the cache, so ``load()`` only deserializes it).
    """
    reason = probe()
    if reason:
        raise EngineUnavailable(reason)
    card = load_model_card(resolve_model(model))
    store = cache or EngineCache()

    def run(reporter: BuildReporter) -> tuple[str, str]:
        precision, path = ensure_engine(card, store, precisions, reporter)
        return precision, str(path)

    job = BuildJob(run)
    job.start()
    return job


class _TrtRunner:
    """Device/pinned buffers, stream, bound addresses and optional CUDA graph for one engine."""

    def __init__(self, engine: Any, card: ModelCard, geometry: Geometry, use_graph: bool) -> None:
        import tensorrt as trt

        rt = _cudart()
        self._rt = rt
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context")
        self.stream = _check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._allocs: list[tuple[int, int]] = []  # (device ptr, host ptr)
        self.host: dict[str, npt.NDArray[Any]] = {}
        self.device: dict[str, int] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        h, w = card.input_hw
        state = set(card.state_inputs)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and name not in state:
                self.context.set_input_shape(name, (1, card.channels, h, w))
            shape = tuple(int(s) for s in self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            dptr = int(_check(rt.cudaMalloc(nbytes), "cudaMalloc"))
            hptr = int(_check(rt.cudaMallocHost(nbytes), "cudaMallocHost"))
            self._allocs.append((dptr, hptr))
            # Zeroed: the previous target log-odds are read (with weight 0) before any frame wrote them,
            # and 0 * NaN from uninitialised memory would be NaN.
            _check(rt.cudaMemset(dptr, 0, nbytes), "cudaMemset")
            ctypes.memset(hptr, 0, nbytes)
            buf = (ctypes.c_byte * nbytes).from_address(hptr)
            self.host[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
            self.device[name] = dptr
            if not self.context.set_tensor_address(name, dptr):  # once; a new address means recapture
                raise EngineError(f"TensorRT refused the address of tensor {name}")
            (self.inputs if is_input else self.outputs).append(name)
        want = 1 + len(state)
        if len(self.inputs) != want or not state <= set(self.inputs):
            raise EngineError(f"engine has inputs {self.inputs}; expected the image and {sorted(state)}")
        self.inputs.sort(key=lambda n: n in state)  # the image first
        #: Alternating-view state: view flag and weight are pinned host inputs copied with the frame;
        #: the previous log-odds of each fused class stay on the device (copied from the matching output
        #: after each run, engines.views.state_pairs).
        self.views: FusionState | None = None
        self.state_pairs = card.state_pairs
        self._resident = frozenset(previous for previous, _ in self.state_pairs)  # inputs never copied H2D
        self._state_outputs = frozenset(own for _, own in self.state_pairs)  # outputs never copied D2H
        if card.fuses_frames:
            missing = [out for _, out in self.state_pairs if out not in self.outputs]
            if missing:
                raise EngineError(f"engine outputs {self.outputs} lack {missing}")
            # A running target's graph has no view flag; its state machine then keeps its own (always 0).
            mirror = self.host[VIEW_MIRRORED].reshape(-1) if VIEW_MIRRORED in self.host else None
            self.views = card.frame_state(mirror=mirror, weight=self.host[PREVIOUS_WEIGHT].reshape(-1))
        self.labels_name = next((n for n in self.outputs if n.startswith(LABELS)), "")
        self.prob_name = PROB if PROB in self.outputs else ""
        self.present: npt.NDArray[np.float32] | None = self.host.get(PRESENCE)
        if not self.labels_name or not self.prob_name:
            raise EngineError(f"engine outputs {self.outputs} lack {LABELS}/{PROB}")
        self.pre = Preprocessor(
            (h, w),
            card.channels,
            card.normalization,
            geometry,
            out=self.host[self.inputs[0]],
            single_region_classes=card.single_region_classes,
            instrument_seed_prob=card.instrument_seed_prob,
            temporal=card.temporal,
        )
        self._use_graph = use_graph
        self._graph_exec: Any = None
        self._graph: Any = None

    def _enqueue(self) -> None:
        rt = self._rt
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            if name in self._resident:  # device-resident state
                continue
            arr = self.host[name]
            _check(
                rt.cudaMemcpyAsync(self.device[name], arr.ctypes.data, arr.nbytes, h2d, self.stream),
                "H2D copy",
            )
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT execute_async_v3 failed")
        # This frame's log-odds become the next frame's previous ones.
        d2d = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for previous, own in self.state_pairs:
            size = self.host[own].nbytes
            _check(
                rt.cudaMemcpyAsync(self.device[previous], self.device[own], size, d2d, self.stream),
                "D2D copy",
            )
        for name in self.outputs:
            if name in self._state_outputs:
                continue
            arr = self.host[name]
            _check(
                rt.cudaMemcpyAsync(arr.ctypes.data, self.device[name], arr.nbytes, d2h, self.stream),
                "D2H copy",
            )

    def _capture(self) -> None:
        rt = self._rt
        self._enqueue()  # one warm-up enqueue first (TensorRT allocates lazily on the first run)
        _check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            self._enqueue()
        finally:
            self._graph = _check(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        self._graph_exec = _check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        logger.info("TensorRT: CUDA graph captured")

    def run(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
        """Run on the prepared pinned input; return the pinned output buffers (reused)."""
        rt = self._rt
        views = self.views
        if views is not None:  # before a capture too: its warm-up enqueue reads the state inputs
            views.begin(self.pre.geometry)
        if self._use_graph and self._graph_exec is None:
            try:
                self._capture()
            except EngineError as exc:
                logger.warning("CUDA graph capture failed (%s); using plain enqueues", exc)
                self._use_graph = False
        if self._graph_exec is not None:
            _check(rt.cudaGraphLaunch(self._graph_exec, self.stream), "cudaGraphLaunch")
        else:
            self._enqueue()
        _check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if views is not None:
            views.end()
        return self.host[self.labels_name][0], self.host[self.prob_name][0]

    def close(self) -> None:
        rt = self._rt
        if self._graph_exec is not None:
            rt.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None
        if self._graph is not None:
            rt.cudaGraphDestroy(self._graph)
            self._graph = None
        self.host.clear()
        for dptr, hptr in self._allocs:
            rt.cudaFree(dptr)
            rt.cudaFreeHost(hptr)
        self._allocs = []
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None


class TensorRTEngine:
    """Segmentation with TensorRT. ``load`` builds (blocking) if the cache has no engine yet.

    For a non-blocking start use :func:`start_background_build` first and create this engine when the
    job is ready.
    """

    name = NAME

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        precisions: Sequence[str] = ("fp16", "fp32"),
        cuda_graph: bool = True,
        geometry: Geometry = "stretch",
        cache_dir: Path | None = None,
    ) -> None:
        self._model_ref = model
        self._precisions = tuple(precisions)
        self._use_graph = cuda_graph
        self._geometry: Geometry = geometry
        self._cache = EngineCache(cache_dir)
        self._card: ModelCard | None = None
        self._runner: _TrtRunner | None = None
        self._runtime: Any = None
        self._precision = ""
        self._gpu = ""

    def load(self) -> None:
        reason = probe()
        if reason:
            raise EngineUnavailable(reason)
        import tensorrt as trt

        card = load_model_card(resolve_model(self._model_ref))
        precision, path = ensure_engine(card, self._cache, self._precisions)
        self._runtime = trt.Runtime(_trt_logger())
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT could not deserialize {path}")
        self._runner = _TrtRunner(engine, card, self._geometry, self._use_graph)
        self._card, self._precision = card, precision
        self._gpu = gpu_identity()[0]
        logger.info("TensorRT %s engine %s (%s) on %s", trt.__version__, path.name, precision, self._gpu)

    def warm_up(self) -> None:
        runner = self._require()
        assert self._card is not None
        for _ in range(3):
            runner.pre.prepare(np.zeros(self._card.input_hw, dtype=np.uint8))
            runner.run()
        self.reset()  # warm-up frames are not the previous frame of the first real one

    def reset(self) -> None:
        """Forget the previous frame (temporal and alternating-view models); a no-op before ``load()``."""
        if self._runner is not None:
            self._runner.pre.reset()
            if self._runner.views is not None:
                self._runner.views.reset()

    def _require(self) -> _TrtRunner:
        if self._runner is None:
            raise EngineError("tensorrt engine used before load()")
        return self._runner

    def infer(self, image: npt.NDArray[np.generic]) -> SegmentationOutput:
        runner = self._require()
        runner.pre.prepare(image)
        labels, prob = runner.run()
        return SegmentationOutput(
            labels=runner.pre.restore_labels(labels, prob),
            instrument_prob=runner.pre.restore_prob(prob),
            scores=presence_scores(runner.present),
        )

    def describe(self) -> EngineInfo:
        card = self._card
        return EngineInfo(
            backend=NAME,
            device=f"cuda:0 ({self._gpu})" if self._gpu else "cuda",
            precision=self._precision or "n/a",
            input_size=card.input_hw if card else None,
            model=card.label if card else str(self._model_ref or "default"),
        )

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        self._runtime = None


register(
    BackendSpec(
        name=NAME,
        priority=30,
        probe=probe,
        factory=TensorRTEngine,
        description="TensorRT 10/11 (NVIDIA GPU; FP16 with FP32 fallback, cached engines, CUDA graph)",
    )
)
