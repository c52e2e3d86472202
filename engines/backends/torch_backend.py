"""torch backend: architecture from ``engines.models.unet`` + the ``<name>.pt`` state dict beside the ONNX.

* CPU: fp32, ``inference_mode``, channels-last, argmax/softmax in torch. Available, but "auto" prefers
  ONNX Runtime on CPU (this backend registers with priority 5 there, below onnxruntime's 10).
* CUDA: priority 20; FP16 weights and activations, channels-last, and the whole step (network, argmax,
  softmax) captured once in a CUDA graph with a preallocated static input, replayed per frame; the input is
  staged in pinned host memory that the preprocessor writes into directly.
* ``optimize=False`` is plain torch eager fp32 (the benchmark's baseline on the same device).

Whether CUDA is likely is decided at registration without importing torch (the wheel's local version tag
and the NVIDIA driver file), so ``import engines.backends`` stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.assets import ModelAssetError, ModelCard, load_model_card, resolve_model
from engines.base import EngineError, EngineInfo, EngineUnavailable, SegmentationOutput, presence_scores
from engines.preprocess import Geometry, Preprocessor
from engines.registry import BackendSpec, register
from engines.views import FusionState

logger = logging.getLogger(__name__)

NAME = "torch"
INSTALL_HINT = "torch is not installed (pip install 'guidance[train]')"


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver is loaded (Linux) — a cheap check that imports nothing."""
    return os.path.exists("/proc/driver/nvidia/version")


def cuda_likely() -> bool:
    """torch is a CUDA build and an NVIDIA driver is present (no torch import)."""
    if not torch_installed():
        return False
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "+cpu" not in version and nvidia_driver_present()


def probe() -> str | None:
    if not torch_installed():
        return INSTALL_HINT
    return None


def probe_cuda() -> str | None:
    """None when torch can run on CUDA here, else the reason (imports torch)."""
    if not torch_installed():
        return INSTALL_HINT
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device" if torch.version.cuda else "no CUDA device (torch is a CPU-only build)"
    return None


def build_torch_model(card: ModelCard) -> Any:
    """The card's architecture with its ``.pt`` state dict loaded, in eval mode, on the CPU (wrapped in
    :class:`engines.models.unet.MirrorEnsemble` when the card's graph averages the mirrored view, in
    :class:`engines.models.unet.AlternatingMirror` when it alternates the view)."""
    import torch

    try:
        from engines.models import unet
    except ImportError as exc:
        raise EngineUnavailable(f"the torch backend needs engines.models.unet: {exc}") from exc
    weights = card.torch_weights_path
    if not weights.is_file():
        raise ModelAssetError(
            f"torch weights {weights} not found (ship {weights.name} beside {card.onnx_path.name})"
        )
    config = card.architecture.get("config")
    if not isinstance(config, dict):
        raise ModelAssetError(
            f"model card {card.card_path} has no architecture.config to rebuild the network"
        )
    model = unet.build_model(config)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelAssetError(f"torch weights {weights} do not fit {card.label}: {exc}") from exc
    model.eval()
    if card.mirror:  # as the card's ONNX graph does: average with the mirrored view
        return unet.MirrorEnsemble(model).eval()
    if card.alternate:  # as the card's ONNX graph does: one view per frame, the target fused over two
        return unet.AlternatingMirror(model, card.instrument_fuse_weight).eval()
    if card.running_target:  # as the card's ONNX graph does: the target a running average over frames
        return unet.RunningTarget(model).eval()
    return model


class TorchEngine:
    """Segmentation with torch. Lifecycle: ``load`` -> ``warm_up`` -> ``infer``* -> ``close``.

    Args:
        model: card/ONNX path or shipped model name (None: the default).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        optimize: channels-last (+ FP16 and CUDA graph on CUDA); False = plain eager fp32 baseline.
        cuda_graph: capture/replay a CUDA graph (CUDA and ``optimize`` only).
        geometry: ``"stretch"`` (as trained) or ``"letterbox"``.
    """

    name = NAME

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        optimize: bool = True,
        cuda_graph: bool = True,
        geometry: Geometry = "stretch",
    ) -> None:
        self._model_ref = model
        self._device_req = device
        self._optimize = optimize
        self._use_graph = cuda_graph
        self._geometry: Geometry = geometry
        self._card: ModelCard | None = None
        self._pre: Preprocessor | None = None
        self._net: Any = None
        self._device: Any = None
        self._cuda = False
        self._graph: Any = None
        self._static_in: Any = None
        self._static_out: tuple[Any, Any, Any] | None = None
        self._host_in: Any = None
        self._host_labels: Any = None
        self._host_prob: Any = None
        self._host_present: Any = None
        self._stream: Any = None
        self._label = "cpu"
        self._shift: Any = None  # (1, C, 1, 1) decision bias of the card, None when there is none
        self._presence = False  # the network has a presence head (its gate is applied as in the graph)
        self._presence_threshold = 0.0
        # alternating-view models: host state (engines.views) and its device copies, see _setup_views
        self._views: FusionState | None = None
        self._pass_view = True  # the graph takes the view flag (alternating views; not a running target)
        #: (mirrored, weight, previous log-odds per fused class in engines.views.state_pairs order)
        self._view_state: tuple[Any, Any, tuple[Any, ...]] | None = None
        self._host_views: tuple[Any, Any] | None = None  # pinned (mirrored, weight) on CUDA

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        if not torch_installed():
            raise EngineUnavailable(INSTALL_HINT)
        import torch

        card = load_model_card(resolve_model(self._model_ref))
        want_cuda = self._device_req in ("auto", "cuda")
        cuda_reason = probe_cuda() if want_cuda else "cpu requested"
        if self._device_req == "cuda" and cuda_reason:
            raise EngineUnavailable(cuda_reason)
        self._cuda = cuda_reason is None
        self._device = torch.device("cuda:0" if self._cuda else "cpu")
        net = build_torch_model(card).to(self._device)
        h, w = card.input_hw
        if self._optimize:
            net = net.to(memory_format=torch.channels_last)
            if self._cuda:
                net = net.half()
        self._net = net
        # The calibrated operating point: the exported graph subtracts it before its argmax, so must we,
        # or this backend would label more instrument than ONNX Runtime or TensorRT on the same frame.
        self._shift = (
            torch.tensor(card.decision_bias, dtype=torch.float32, device=self._device).view(1, -1, 1, 1)
            if card.decision_bias
            else None
        )
        self._presence = getattr(net, "presence", None) is not None
        self._presence_threshold = card.presence_threshold
        if self._cuda:
            self._host_in = torch.zeros((1, card.channels, h, w), dtype=torch.float32).pin_memory()
            self._host_labels = torch.zeros((1, h, w), dtype=torch.uint8).pin_memory()
            self._host_prob = torch.zeros((1, h, w), dtype=torch.float32).pin_memory()
            self._host_present = torch.zeros((1,), dtype=torch.float32).pin_memory()
            self._pre = Preprocessor(
                (h, w),
                card.channels,
                card.normalization,
                self._geometry,
                out=self._host_in.numpy(),
                single_region_classes=card.single_region_classes,
                instrument_seed_prob=card.instrument_seed_prob,
                temporal=card.temporal,
            )
            dtype = torch.float16 if self._optimize else torch.float32
            fmt = torch.channels_last if self._optimize else torch.contiguous_format
            self._static_in = torch.zeros(
                (1, card.channels, h, w), device=self._device, dtype=dtype
            ).contiguous(memory_format=fmt)
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._label = f"cuda:0 ({torch.cuda.get_device_name(0)})"
        else:
            self._pre = Preprocessor(
                (h, w),
                card.channels,
                card.normalization,
                self._geometry,
                single_region_classes=card.single_region_classes,
                instrument_seed_prob=card.instrument_seed_prob,
                temporal=card.temporal,
            )
            self._label = f"cpu ({torch.get_num_threads()} threads)"
        if card.fuses_frames:
            self._setup_views(torch, card, (h, w))
        self._card = card
        logger.info(
            "torch %s loaded %s on %s (optimize=%s)",
            torch.__version__,
            card.label,
            self._label,
            self._optimize,
        )

    def _setup_views(self, torch: Any, card: ModelCard, hw: tuple[int, int]) -> None:
        """State of a model that fuses frames: view flag and weight written by
        :class:`engines.views.FusionState` (into pinned memory on CUDA, copied to the device with the
        frame), and the previous log-odds of each fused class (engines.views.state_pairs), device tensors
        the step overwrites in place. A running target's graph takes no view flag: its buffer is kept
        (always 0) but not passed."""
        fused = len(card.state_pairs)
        self._pass_view = card.alternate
        dtype = torch.float16 if (self._cuda and self._optimize) else torch.float32
        if self._cuda:
            mirror_h = torch.zeros((1,), dtype=torch.float32).pin_memory()
            weight_h = torch.zeros((1,), dtype=torch.float32).pin_memory()
            self._host_views = (mirror_h, weight_h)
            self._views = card.frame_state(mirror=mirror_h.numpy(), weight=weight_h.numpy())
            mirror = torch.zeros((1,), dtype=dtype, device=self._device)
            weight = torch.zeros((1,), dtype=dtype, device=self._device)
        else:
            self._views = card.frame_state()
            assert self._views is not None
            mirror, weight = torch.from_numpy(self._views.mirror), torch.from_numpy(self._views.weight)
        previous = tuple(torch.zeros((1, *hw), dtype=dtype, device=self._device) for _ in range(fused))
        self._view_state = (mirror, weight, previous)

    def _step(self, x: Any) -> tuple[Any, Any, Any]:
        """``(labels, instrument prob, instrument_present or None)`` as the exported graph computes them."""
        import torch

        present = None
        if self._view_state is not None:
            mirror, weight, previous = self._view_state
            view = (mirror,) if self._pass_view else ()
            logits, own, presence = self._net.forward_with_presence(
                x, *view, previous[0], weight, *previous[1:]
            )
            for state, new in zip(previous, own, strict=True):
                state.copy_(new)  # in place: the next frame's input, also inside a captured CUDA graph
            logits = logits.float()
            if self._presence and presence is not None:
                present = torch.sigmoid(presence.float())
        elif self._presence:
            logits, presence = self._net.forward_with_presence(x)
            logits = logits.float()
            present = torch.sigmoid(presence.float())
        else:
            logits = self._net(x).float()
        prob = torch.softmax(logits, dim=1)[:, 1]  # from the raw logits, before the decision bias
        if self._shift is not None:
            logits.sub_(self._shift)  # in place: no second logits tensor per frame
        labels = torch.argmax(logits, dim=1).to(torch.uint8)
        if present is not None and self._presence_threshold > 0.0:
            gate = (present < self._presence_threshold).view(-1, 1, 1) & (labels == 1)
            labels.masked_fill_(gate, 0)
        return labels, prob, present

    def warm_up(self) -> None:
        card, _ = self._require()
        import torch

        frame = np.zeros(card.input_hw, dtype=np.uint8)
        if self._cuda:
            with torch.inference_mode(), torch.cuda.stream(self._stream):
                for _ in range(3):
                    self._step(self._static_in)
            self._stream.synchronize()
            if self._optimize and self._use_graph:
                self._capture()
        for _ in range(2):
            self.infer(frame)
        self.reset()  # warm-up frames are not the previous frame of the first real one

    def reset(self) -> None:
        """Forget the previous frame (temporal and alternating-view models); a no-op before ``load()``."""
        if self._pre is not None:
            self._pre.reset()
        if self._views is not None:
            self._views.reset()

    def _capture(self) -> None:
        """Capture network + argmax + softmax as one CUDA graph reading the static input."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode():
            self._stream.synchronize()
            with torch.cuda.graph(graph, stream=self._stream):
                self._static_out = self._step(self._static_in)
        self._graph = graph
        logger.info("torch: CUDA graph captured")

    def _require(self) -> tuple[ModelCard, Preprocessor]:
        if self._card is None or self._pre is None or self._net is None:
            raise EngineError("torch engine used before load()")
        return self._card, self._pre

    def infer(self, image: npt.NDArray[np.generic]) -> SegmentationOutput:
        _, pre = self._require()
        import torch

        pre.prepare(image)
        views = self._views
        if views is not None:
            views.begin(pre.geometry)
        with torch.inference_mode():
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    self._static_in.copy_(self._host_in, non_blocking=True)
                    if self._host_views is not None and self._view_state is not None:
                        self._view_state[0].copy_(self._host_views[0], non_blocking=True)
                        self._view_state[1].copy_(self._host_views[1], non_blocking=True)
                    if self._graph is not None and self._static_out is not None:
                        self._graph.replay()
                        labels, prob, present = self._static_out
                    else:
                        labels, prob, present = self._step(self._static_in)
                    self._host_labels.copy_(labels, non_blocking=True)
                    self._host_prob.copy_(prob, non_blocking=True)
                    if present is not None:
                        self._host_present.copy_(present, non_blocking=True)
                self._stream.synchronize()
                lab_np, prob_np = self._host_labels.numpy(), self._host_prob.numpy()
                present_np = self._host_present.numpy() if present is not None else None
            else:
                x = torch.from_numpy(pre.tensor)
                if self._optimize:
                    x = x.contiguous(memory_format=torch.channels_last)
                labels, prob, present = self._step(x)
                lab_np, prob_np = labels.numpy(), prob.numpy()
                present_np = present.numpy() if present is not None else None
        if views is not None:
            views.end()
        return SegmentationOutput(
            labels=pre.restore_labels(lab_np[0], prob_np[0]),
            instrument_prob=pre.restore_prob(prob_np[0]),
            scores=presence_scores(present_np),
        )

    def describe(self) -> EngineInfo:
        card = self._card
        precision = "fp16" if (self._cuda and self._optimize) else "fp32"
        mode = "" if self._optimize else ", eager"
        return EngineInfo(
            backend=NAME,
            device=self._label + mode,
            precision=precision,
            input_size=card.input_hw if card else None,
            model=card.label if card else str(self._model_ref or "default"),
        )

    def close(self) -> None:
        self._graph = None
        self._static_out = None
        self._static_in = None
        self._net = None
        self._stream = None


register(
    BackendSpec(
        name=NAME,
        priority=20 if cuda_likely() else 5,
        probe=probe,
        factory=TorchEngine,
        description="torch (CUDA: FP16 + CUDA graph; CPU: available, auto prefers onnxruntime)",
    )
)
