"""ONNX Runtime backend: the embedded default (CPU; the CUDA execution provider with onnxruntime-gpu).

Tuning (measured on the 2-core development VM, random-init default U-Net at 256x256, see the report of
``guidance bench engines``):

* ``intra_op_num_threads`` = physical cores (``psutil.cpu_count(logical=False)``), ``inter_op`` = 1,
  sequential execution, graph optimisation level ALL.
* Spinning (``session.intra_op.allow_spinning``) is **off** by default. With spinning on, the worker
  threads busy-wait between frames: it bought no measurable latency at a 30 fps frame interval, but burnt
  a whole core between frames, which the receiver and the GUI thread need (and, on a shared machine,
  made p99 worse). ``spinning=True`` turns it on for benchmarks that run back-to-back inference.
* Denormals are flushed to zero (``session.set_denormal_as_zero``): the largest single gain measured,
  see :meth:`OnnxRuntimeEngine.load`.
* IO binding: the input tensor and the two outputs (three with a presence head) are preallocated numpy buffers wrapped once in
  ``OrtValue``\\ s (no copy) and bound once; :class:`engines.preprocess.Preprocessor` writes the input
  straight into the bound buffer.
* Argmax and the instrument softmax run inside the graph: if the model only outputs logits, ArgMax(+Cast)
  and Softmax(+Gather) nodes are appended at load time (:func:`add_label_outputs`); only ``labels`` and
  ``instrument_prob`` are bound, so the logits never leave the session.
* Models that fuse frames (alternating views, card ``test_time.mirror`` = ``"alternate"``, or a running
  target, card ``test_time.fusion`` = ``"running"``; :mod:`engines.views`): the view flag (alternating
  views) and the weight are one-element bound buffers rewritten in place per frame; the target log-odds
  (and the instrument's, where the card fuses it) each live in two bound buffers that swap roles (this
  frame's output, the next frame's input) by rebinding, so the state is never copied.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.assets import ModelCard, load_model_card, resolve_model
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
from engines.views import PREVIOUS_WEIGHT, VIEW_MIRRORED, FusionState

logger = logging.getLogger(__name__)

NAME = "onnxruntime"
LABELS = "labels"
PROB = "instrument_prob"


def probe() -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
    return None


def providers_available() -> list[str]:
    """Execution providers of the installed onnxruntime (imports it)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    if not n:
        import os

        n = os.cpu_count() or 1
    return int(n)


def add_label_outputs(model: Any, logits: str, labels_dtype: str = "uint8") -> tuple[Any, str, str]:
    """Make ``model`` (an ``onnx.ModelProto``) output ``labels`` and ``instrument_prob`` in-graph.

    Outputs already named ``labels``/``instrument_prob`` are kept. Otherwise appends
    ``ArgMax(logits, axis=1, keepdims=0) -> Cast(labels_dtype)`` and
    ``Softmax(logits, axis=1) -> Gather(index 1, axis=1)``. Returns ``(model, labels_name, prob_name)``.
    ``labels_dtype`` is ``"uint8"`` (ONNX Runtime) or ``"int32"`` (TensorRT).
    """
    import onnx
    from onnx import TensorProto, helper

    names = [o.name for o in model.graph.output]
    to = {"uint8": TensorProto.UINT8, "int32": TensorProto.INT32}[labels_dtype]
    dims: list[str | int] = ["N", "H", "W"]
    for o in model.graph.output:
        if o.name == logits and len(o.type.tensor_type.shape.dim) == 4:
            d = o.type.tensor_type.shape.dim
            dims = [
                x.dim_value if x.HasField("dim_value") else (x.dim_param or f"d{i}") for i, x in enumerate(d)
            ]
            dims = [dims[0], dims[2], dims[3]]
    labels_name = LABELS
    if LABELS in names:
        existing = next(o for o in model.graph.output if o.name == LABELS)
        if existing.type.tensor_type.elem_type != to:
            labels_name = f"{LABELS}_{labels_dtype}"
            model.graph.node.append(helper.make_node("Cast", [LABELS], [labels_name], to=to))
            model.graph.output.append(helper.make_tensor_value_info(labels_name, to, dims))
    else:
        model.graph.node.extend(
            [
                helper.make_node("ArgMax", [logits], ["_g_argmax"], axis=1, keepdims=0),
                helper.make_node("Cast", ["_g_argmax"], [LABELS], to=to),
            ]
        )
        model.graph.output.append(helper.make_tensor_value_info(LABELS, to, dims))
    if PROB not in names:
        model.graph.initializer.append(helper.make_tensor("_g_one", TensorProto.INT64, [], [1]))
        model.graph.node.extend(
            [
                helper.make_node("Softmax", [logits], ["_g_softmax"], axis=1),
                helper.make_node("Gather", ["_g_softmax", "_g_one"], [PROB], axis=1),
            ]
        )
        model.graph.output.append(helper.make_tensor_value_info(PROB, TensorProto.FLOAT, dims))
    onnx.checker.check_model(model)
    return model, labels_name, PROB


def logits_output(model: Any) -> str:
    """Name of the first 4-D float output (the class logits)."""
    from onnx import TensorProto

    for o in model.graph.output:
        tt = o.type.tensor_type
        if tt.elem_type == TensorProto.FLOAT and len(tt.shape.dim) == 4:
            return str(o.name)
    raise EngineError("the ONNX model has no 4-D float logits output")


def prepare_model_bytes(card: ModelCard, labels_dtype: str = "uint8") -> tuple[bytes, str, str]:
    """The card's ONNX model with in-graph labels/probability outputs, serialised."""
    names = card.output_names()
    if LABELS in names and PROB in names and labels_dtype == "uint8":
        return card.onnx_path.read_bytes(), LABELS, PROB
    try:
        import onnx
    except ImportError as exc:
        raise EngineError(
            f"model {card.name} outputs only logits and adding argmax needs the onnx package: {exc}"
        ) from exc
    model = onnx.load(str(card.onnx_path))
    model, lab, prob = add_label_outputs(model, logits_output(model), labels_dtype)
    return model.SerializeToString(), lab, prob


class OnnxRuntimeEngine:
    """Segmentation with ONNX Runtime. Lifecycle: ``load`` -> ``warm_up`` -> ``infer``* -> ``close``.

    Args:
        model: card/ONNX path or shipped model name (None: the default model).
        device: ``"auto"`` (CUDA EP when onnxruntime-gpu has it), ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads (default: physical cores).
        spinning: let ORT worker threads spin between runs (see module docstring).
        geometry: ``"stretch"`` (as trained) or ``"letterbox"``.
    """

    name = NAME

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        threads: int | None = None,
        spinning: bool = False,
        geometry: Geometry = "stretch",
        providers: Sequence[str] | None = None,
    ) -> None:
        self._model = model
        self._device = device
        self._threads = threads
        self._spinning = spinning
        self._geometry: Geometry = geometry
        self._providers = list(providers) if providers else None
        self._session: Any = None
        self._binding: Any = None
        self._card: ModelCard | None = None
        self._pre: Preprocessor | None = None
        self._labels: npt.NDArray[np.uint8] = np.zeros((0, 0, 0), dtype=np.uint8)
        self._prob: npt.NDArray[np.float32] = np.zeros((0, 0, 0), dtype=np.float32)
        #: ``instrument_present`` of a model with a presence head (bound only then)
        self._present: npt.NDArray[np.float32] | None = None
        self._keep: list[Any] = []
        self._device_label = "cpu"
        # models that fuse frames (alternating views, running target): see _bind_views
        self._views: FusionState | None = None
        #: per state pair (engines.views.state_pairs): (input name, output name, its two buffers' OrtValues)
        self._state: list[tuple[str, str, tuple[Any, Any]]] = []
        self._current = 0

    def load(self) -> None:
        reason = probe()
        if reason:
            raise EngineUnavailable(reason)
        import onnxruntime as ort

        card = load_model_card(resolve_model(self._model))
        model_bytes, labels_name, prob_name = prepare_model_bytes(card, "uint8")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        threads = self._threads or physical_cores()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # Flush denormal floats to zero. Trained weights leave activations in the denormal range, where
        # x86 arithmetic takes a microcode slow path: measured on the shipped model at 256x256 (2 cores,
        # interleaved with torch as in `guidance bench engines`), p50 9.5 -> 8.1 ms and p99 11.3 -> 8.7 ms.
        # Values below 1.2e-38 do not move a label or a probability.
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
        available = set(ort.get_available_providers())
        providers = self._providers
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self._device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
                providers.insert(0, "CUDAExecutionProvider")
            elif self._device == "cuda":
                raise EngineUnavailable(
                    "onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)"
                )
        try:
            session = ort.InferenceSession(model_bytes, so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph...)
            raise EngineError(f"onnxruntime could not load {card.onnx_path.name}: {exc}") from exc
        used = session.get_providers()
        self._device_label = (
            "cuda:0" if used and used[0] == "CUDAExecutionProvider" else f"cpu ({threads} threads)"
        )
        inputs = session.get_inputs()
        want = [card.input_name or inputs[0].name, *card.state_inputs]
        if len(inputs) != len(want) or [i.name for i in inputs[1:]] != want[1:]:
            raise EngineError(
                f"model {card.name} has inputs {[i.name for i in inputs]}; its card asks for {len(want)}"
                + (f" ({', '.join(want[1:])} beside the image)" if card.fuses_frames else "")
            )
        h, w = card.input_hw
        shape = inputs[0].shape
        if len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]) and tuple(shape[2:]) != (h, w):
            raise EngineError(f"model {card.name}: ONNX input {shape} disagrees with card input {h}x{w}")
        if len(shape) == 4 and isinstance(shape[1], int) and shape[1] != card.channels:
            raise EngineError(
                f"model {card.name}: ONNX input {shape} has {shape[1]} channels, "
                f"the card says {card.channels}"
            )
        pre = Preprocessor(
            (h, w),
            card.channels,
            card.normalization,
            self._geometry,
            single_region_classes=card.single_region_classes,
            instrument_seed_prob=card.instrument_seed_prob,
            temporal=card.temporal,
        )
        self._labels = np.zeros((1, h, w), dtype=np.uint8)
        self._prob = np.zeros((1, h, w), dtype=np.float32)
        binding = session.io_binding()
        in_val = ort.OrtValue.ortvalue_from_numpy(pre.tensor)
        lab_val = ort.OrtValue.ortvalue_from_numpy(self._labels)
        prob_val = ort.OrtValue.ortvalue_from_numpy(self._prob)
        binding.bind_ortvalue_input(inputs[0].name, in_val)
        binding.bind_ortvalue_output(labels_name, lab_val)
        binding.bind_ortvalue_output(prob_name, prob_val)
        self._keep = [in_val, lab_val, prob_val]
        self._present = None
        if PRESENCE in card.output_names() and PRESENCE in {o.name for o in session.get_outputs()}:
            self._present = np.zeros((1,), dtype=np.float32)
            present_val = ort.OrtValue.ortvalue_from_numpy(self._present)
            binding.bind_ortvalue_output(PRESENCE, present_val)
            self._keep.append(present_val)
        self._views = None
        if card.fuses_frames:
            self._bind_views(ort, binding, card, (h, w))
        self._session, self._binding, self._card, self._pre = session, binding, card, pre
        logger.info(
            "onnxruntime %s loaded %s on %s (spinning %s)", ort.__version__, card.label, used, self._spinning
        )

    def _bind_views(self, ort: Any, binding: Any, card: ModelCard, hw: tuple[int, int]) -> None:
        """Bind the state of a model that fuses frames (:mod:`engines.views`): the view flag (alternating
        views) and the weight are rewritten in place per frame; each fused class's log-odds live in two
        buffers whose roles (this frame's output, next frame's input) swap after every frame, so nothing
        is copied."""
        views = card.frame_state()
        assert views is not None
        weight_val = ort.OrtValue.ortvalue_from_numpy(views.weight)
        binding.bind_ortvalue_input(PREVIOUS_WEIGHT, weight_val)
        self._keep.append(weight_val)
        if VIEW_MIRRORED in card.state_inputs:
            mirror_val = ort.OrtValue.ortvalue_from_numpy(views.mirror)
            binding.bind_ortvalue_input(VIEW_MIRRORED, mirror_val)
            self._keep.append(mirror_val)
        self._state = []
        for input_name, output_name in card.state_pairs:
            buffers = tuple(
                ort.OrtValue.ortvalue_from_numpy(np.zeros((1, *hw), dtype=np.float32)) for _ in range(2)
            )
            self._keep += buffers
            self._state.append((input_name, output_name, (buffers[0], buffers[1])))
        self._views, self._current = views, 0
        self._bind_state(binding)

    def _bind_state(self, binding: Any) -> None:
        """This frame reads buffer ``_current`` of each pair as the previous log-odds and writes the
        other."""
        for input_name, output_name, buffers in self._state:
            binding.bind_ortvalue_input(input_name, buffers[self._current])
            binding.bind_ortvalue_output(output_name, buffers[1 - self._current])

    def warm_up(self) -> None:
        card = self._require()[0]
        frame = np.zeros(card.input_hw, dtype=np.uint8)
        for _ in range(3):
            self.infer(frame)
        self.reset()  # warm-up frames are not the previous frame of the first real one

    def reset(self) -> None:
        """Forget the previous frame (temporal and alternating-view models); a no-op before ``load()``."""
        if self._pre is not None:
            self._pre.reset()
        if self._views is not None:
            self._views.reset()

    def _require(self) -> tuple[ModelCard, Preprocessor]:
        if self._card is None or self._pre is None:
            raise EngineError("onnxruntime engine used before load()")
        return self._card, self._pre

    def run_tensor(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """Run on the already-prepared input tensor; return the bound (reused) output buffers.

        An alternating-view model runs in its current state (a fresh engine: plain view, nothing fused).
        """
        self._session.run_with_iobinding(self._binding)
        return self._labels, self._prob

    def infer(self, image: npt.NDArray[np.generic]) -> SegmentationOutput:
        _, pre = self._require()
        pre.prepare(image)
        views = self._views
        if views is None:
            labels, prob = self.run_tensor()
        else:
            views.begin(pre.geometry)
            labels, prob = self.run_tensor()
            views.end()
            self._current ^= 1  # this frame's log-odds are the next frame's previous ones
            self._bind_state(self._binding)
        return SegmentationOutput(
            labels=pre.restore_labels(labels[0], prob[0]),
            instrument_prob=pre.restore_prob(prob[0]),
            scores=presence_scores(self._present),
        )

    @property
    def preprocessor(self) -> Preprocessor:
        return self._require()[1]

    def describe(self) -> EngineInfo:
        card = self._card
        return EngineInfo(
            backend=NAME,
            device=self._device_label,
            precision="fp32",
            input_size=card.input_hw if card else None,
            model=card.label if card else str(self._model or "default"),
        )

    def close(self) -> None:
        self._binding = None
        self._session = None
        self._keep = []


register(
    BackendSpec(
        name=NAME,
        priority=10,
        probe=probe,
        factory=OnnxRuntimeEngine,
        description="ONNX Runtime (embedded default; CPU, or CUDA with onnxruntime-gpu)",
    )
)
