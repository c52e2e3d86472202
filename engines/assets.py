"""Model assets: ``assets/models/<name>.onnx`` beside its ``<name>.json`` model card, loaded sha256-verified.

The card format is the one written by :func:`engines.models.unet.write_model_card` (fields ``name``,
``version``, ``classes``, ``input``, ``normalization``, ``output``, ``architecture``, ``training``,
``evaluation``, ``onnx {file, opset, sha256}``, ``intended_use``, ``limits``). A top-level ``sha256`` is
accepted as well. :func:`load_model_card` refuses an ONNX file whose hash differs from the card, saying
which file, the expected and the actual hash.

``input.channel_meaning`` says what the input channels hold: ``["current frame"]`` (one channel; a card
without the field gets the frame in every channel, as before) or ``["current frame", "current frame minus
previous frame"]`` (two channels: a temporal model, :attr:`ModelCard.temporal`); anything else is refused.

Torch weights, for the torch backend, are ``<name>.pt`` beside the ONNX file: a ``state_dict`` of
``engines.models.unet.build_model(card["architecture"]["config"])`` (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.base import CLASS_NAMES, INSTRUMENT, TARGET, EngineError
from engines.models.preprocess import SINGLE_FRAME_CHANNELS, TEMPORAL_CHANNELS
from engines.preprocess import Normalization, PreprocessError
from engines.views import ALTERNATE, FUSE_WEIGHT, RUNNING, FusionState, state_inputs, state_pairs

logger = logging.getLogger(__name__)

#: Where shipped models live (``<repo>/assets/models``); ``GUIDANCE_MODELS_DIR`` overrides it.
MODELS_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"
#: The shipped model used when settings name none.
DEFAULT_MODEL_NAME = "guidance-unet"


class ModelAssetError(EngineError):
    """A model file or card is missing, malformed or does not match its hash; one readable line."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class ModelCard:
    """The parts of a model card the engines use, plus the raw card."""

    name: str
    version: str
    classes: tuple[str, ...]
    input_name: str
    input_hw: tuple[int, int]
    channels: int
    normalization: Normalization
    output_kind: str
    outputs: tuple[OutputTensor, ...]
    sha256: str
    onnx_path: Path
    card_path: Path
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: Class indices reduced to their one main region after inference (card ``postprocess``).
    single_region_classes: tuple[int, ...] = ()
    #: Instrument regions with no pixel at this instrument probability are cleared (card ``postprocess``
    #: ``instrument_seed_prob``; 0: off). See :func:`engines.preprocess.keep_seeded_regions`.
    instrument_seed_prob: float = 0.0
    #: Per class, what is subtracted from its logit before the label decision (card ``output``
    #: ``instrument_logit_bias`` / ``target_logit_bias``, the calibrated operating point). Graphs that
    #: output labels have it built in; a backend that decides from logits itself must apply it.
    decision_bias: tuple[float, ...] = ()
    #: Frames whose ``instrument_present`` output (models with a presence head) is below this have no
    #: instrument pixels (card ``output.presence_threshold``; 0: no gate). Graphs that output labels have
    #: it built in; a backend that decides from logits itself must apply it.
    presence_threshold: float = 0.0
    #: The input is ``[current frame, current frame - previous frame]`` (card ``input.channel_meaning``);
    #: the engine keeps the previous frame of the stream and forgets it on ``reset()``.
    temporal: bool = False
    #: The graph averages the frame's logits with its left-right mirror image's (card ``test_time.mirror``
    #: ``"horizontal"``): two network passes per frame. A backend that runs the network itself must too.
    mirror: bool = False
    #: The view alternates from frame to frame and the target is fused with the previous frame's (card
    #: ``test_time.mirror`` ``"alternate"``): one pass per frame, state inputs beside the image and state
    #: outputs (:attr:`state_inputs`, :attr:`state_pairs`; :mod:`engines.views`). The engine keeps that
    #: state and forgets it on ``reset()``.
    alternate: bool = False
    #: An alternating-view model that fuses the instrument too (card ``test_time.fused_classes`` holds
    #: ``"instrument"``): the previous frame's share of its log-odds (card ``test_time.fuse_weights``;
    #: 0: not fused). One more state input and output (:func:`engines.views.state_pairs`).
    instrument_fuse_weight: float = 0.0
    #: The target log-odds are a running average over the frames, in the plain view (card
    #: ``test_time.fusion`` ``"running"``): the previous average's share (card
    #: ``test_time.fuse_weights.target``); 0: no running target. One pass per frame, state as for
    #: alternating views but without the view flag (:mod:`engines.views`).
    running_target: float = 0.0

    @property
    def fuse_instrument(self) -> bool:
        return self.alternate and self.instrument_fuse_weight > 0.0

    @property
    def fuses_frames(self) -> bool:
        """Whether the graph fuses each frame with the previous one (alternating views or a running
        target): the engine keeps state between frames and forgets it on ``reset()``."""
        return self.alternate or self.running_target > 0.0

    @property
    def state_inputs(self) -> tuple[str, ...]:
        """The graph's inputs besides the image (models that fuse frames), in declaration order."""
        return state_inputs(self.fuse_instrument, self.alternate) if self.fuses_frames else ()

    @property
    def state_pairs(self) -> tuple[tuple[str, str], ...]:
        """``(state input, output feeding it on the next frame)`` of a model that fuses frames."""
        return state_pairs(self.fuse_instrument) if self.fuses_frames else ()

    def frame_state(
        self,
        mirror: npt.NDArray[np.float32] | None = None,
        weight: npt.NDArray[np.float32] | None = None,
    ) -> FusionState | None:
        """The view/weight state machine an engine keeps for this model (None: it fuses no frames);
        ``mirror`` and ``weight`` as :class:`engines.views.FusionState` takes them."""
        if not self.fuses_frames:
            return None
        share = self.running_target if self.running_target > 0.0 else FUSE_WEIGHT
        return FusionState(mirror, weight, alternate=self.alternate, previous_share=share)

    @property
    def torch_weights_path(self) -> Path:
        return self.onnx_path.with_suffix(".pt")

    @property
    def architecture(self) -> Mapping[str, Any]:
        arch = self.raw.get("architecture", {})
        return arch if isinstance(arch, Mapping) else {}

    @property
    def label(self) -> str:
        """Name and version, and the test-time views where the graph has any: two cards of the same
        weights (e.g. plain and alternating) must not read the same in the engine panel or a recording."""
        views = ""
        if self.mirror:
            views = " (mirrored views)"
        elif self.alternate:
            fused = f", instrument fused {self.instrument_fuse_weight:g}" if self.fuse_instrument else ""
            views = f" (alternating views{fused})"
        elif self.running_target > 0.0:
            views = f" (running target {self.running_target:g})"
        return f"{self.name} {self.version}{views}"

    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _req(d: Mapping[str, Any], key: str, where: Path) -> Any:
    if key not in d:
        raise ModelAssetError(f"model card {where} lacks the field {key!r}")
    return d[key]


def _is_temporal(card_path: Path, channels: int, meaning: Any) -> bool:
    """Whether the card's ``input`` describes a temporal model; refuse meanings this build cannot feed."""
    if meaning is None:  # cards written before channel_meaning existed: the frame in every channel
        return False
    got = tuple(str(m) for m in meaning) if isinstance(meaning, (list, tuple)) else None
    if got == SINGLE_FRAME_CHANNELS and channels == 1:
        return False
    if got == TEMPORAL_CHANNELS and channels == 2:
        return True
    raise ModelAssetError(
        f"model card {card_path} gives input.channel_meaning {meaning!r} with {channels} channel(s), "
        f"but this build understands only {list(SINGLE_FRAME_CHANNELS)} with 1 channel "
        f"or {list(TEMPORAL_CHANNELS)} with 2 channels"
    )


def parse_model_card(card_path: Path, data: Mapping[str, Any]) -> ModelCard:
    """Build a :class:`ModelCard` from a card's JSON (no hash check)."""
    try:
        inp = _req(data, "input", card_path)
        onnx_block = data.get("onnx", {}) if isinstance(data.get("onnx"), Mapping) else {}
        sha = str(onnx_block.get("sha256") or data.get("sha256") or "")
        if not sha:
            raise ModelAssetError(f"model card {card_path} has no sha256 of its ONNX file")
        onnx_name = str(onnx_block.get("file") or card_path.with_suffix(".onnx").name)
        layout = str(inp.get("layout", "NCHW"))
        dtype = str(inp.get("dtype", "float32"))
        if layout != "NCHW" or dtype != "float32":
            raise ModelAssetError(f"model card {card_path}: input must be NCHW float32, got {layout} {dtype}")
        out = data.get("output", {})
        tensors = tuple(
            OutputTensor(
                str(t["name"]), tuple(int(s) for s in t.get("shape", ())), str(t.get("dtype", "float32"))
            )
            for t in out.get("tensors", ())
        )
        classes = tuple(str(c) for c in _req(data, "classes", card_path))
        if classes != CLASS_NAMES[: len(classes)] or len(classes) < 2:
            raise ModelAssetError(
                f"model card {card_path}: classes {list(classes)} do not match {list(CLASS_NAMES)}"
            )
        norm = Normalization.from_card(_req(data, "normalization", card_path))
        post = data.get("postprocess", {})
        single = tuple(
            str(c) for c in (post.get("single_region_classes", ()) if isinstance(post, Mapping) else ())
        )
        unknown = [c for c in single if c not in classes or c == classes[0]]
        if unknown:
            raise ModelAssetError(
                f"model card {card_path}: postprocess names classes {unknown} that are not foreground classes"
            )
        seed_prob = float((post.get("instrument_seed_prob") if isinstance(post, Mapping) else None) or 0.0)
        if not 0.0 <= seed_prob < 1.0:
            raise ModelAssetError(
                f"model card {card_path}: postprocess instrument_seed_prob {seed_prob} is not in [0, 1)"
            )
        bias = [0.0] * len(classes)
        for idx, key in ((1, "instrument_logit_bias"), (2, "target_logit_bias")):
            if idx < len(bias) and out.get(key) is not None:
                bias[idx] = float(out[key])
                if not math.isfinite(bias[idx]):
                    raise ModelAssetError(f"model card {card_path}: output {key} is not a finite number")
        channels = int(inp.get("channels", 1))
        temporal = _is_temporal(card_path, channels, inp.get("channel_meaning"))
        presence_threshold = float(out.get("presence_threshold") or 0.0)
        if not 0.0 <= presence_threshold <= 1.0:
            raise ModelAssetError(
                f"model card {card_path}: output presence_threshold {presence_threshold} is not in [0, 1]"
            )
        test_time = data.get("test_time") or {}
        if not isinstance(test_time, Mapping):
            raise ModelAssetError(f"model card {card_path}: test_time must be an object")
        mirror_axis = test_time.get("mirror")
        if mirror_axis not in (None, "horizontal", ALTERNATE):
            raise ModelAssetError(
                f"model card {card_path}: test_time mirror {mirror_axis!r} is not supported "
                f"(this build knows 'horizontal', both views in every frame, and {ALTERNATE!r})"
            )
        instrument_fuse_weight = (
            _instrument_fuse_weight(card_path, test_time) if mirror_axis == ALTERNATE else 0.0
        )
        running_target = _running_target(card_path, test_time, mirror_axis)
        return ModelCard(
            name=str(_req(data, "name", card_path)),
            version=str(data.get("version", "")),
            classes=classes,
            input_name=str(inp.get("name", "")),
            input_hw=(int(inp["height"]), int(inp["width"])),
            channels=channels,
            normalization=norm,
            output_kind=str(out.get("kind", "logits")),
            outputs=tensors,
            sha256=sha.lower(),
            onnx_path=card_path.parent / onnx_name,
            card_path=card_path,
            raw=MappingProxyType(dict(data)),
            single_region_classes=tuple(classes.index(c) for c in single),
            instrument_seed_prob=seed_prob,
            decision_bias=tuple(bias) if any(bias) else (),
            presence_threshold=presence_threshold,
            temporal=temporal,
            mirror=mirror_axis == "horizontal",
            alternate=mirror_axis == ALTERNATE,
            instrument_fuse_weight=instrument_fuse_weight,
            running_target=running_target,
        )
    except PreprocessError as exc:
        raise ModelAssetError(f"model card {card_path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelAssetError(f"model card {card_path} is malformed: {exc!r}") from exc


def _instrument_fuse_weight(card_path: Path, test_time: Mapping[str, Any]) -> float:
    """The previous frame's share of the instrument log-odds of an alternating-view card (0: only the
    target is fused); refuse other sets of fused classes and an instrument weight outside (0, 1)."""
    fused = tuple(test_time.get("fused_classes") or ())
    target_only = (CLASS_NAMES[TARGET],)
    both = (CLASS_NAMES[INSTRUMENT], CLASS_NAMES[TARGET])
    if fused not in (target_only, both):
        raise ModelAssetError(
            f"model card {card_path}: test_time fused_classes {list(fused)!r} is not supported (this build "
            f"fuses {list(target_only)!r} or {list(both)!r})"
        )
    if fused == target_only:
        return 0.0
    weights = test_time.get("fuse_weights")
    weight = weights.get(CLASS_NAMES[INSTRUMENT]) if isinstance(weights, Mapping) else None
    if not isinstance(weight, (int, float)) or not 0.0 < float(weight) < 1.0:
        raise ModelAssetError(
            f"model card {card_path}: test_time fuse_weights must give the fused instrument a weight above "
            f"0 and below 1, got {weights!r}"
        )
    return float(weight)


def _running_target(card_path: Path, test_time: Mapping[str, Any], mirror_axis: Any) -> float:
    """The previous average's share of a running-target card (``test_time.fusion`` ``"running"``), else 0;
    refuse another fusion, one combined with mirrored views, other fused classes and a weight outside
    (0, 1)."""
    fusion = test_time.get("fusion")
    if fusion is None:
        return 0.0
    if fusion != RUNNING:
        raise ModelAssetError(
            f"model card {card_path}: test_time fusion {fusion!r} is not supported (this build knows {RUNNING!r})"
        )
    if mirror_axis is not None:
        raise ModelAssetError(
            f"model card {card_path}: test_time fusion {RUNNING!r} runs the plain view only, "
            f"but the card also asks for mirror {mirror_axis!r}"
        )
    fused = tuple(test_time.get("fused_classes") or ())
    if fused != (CLASS_NAMES[TARGET],):
        raise ModelAssetError(
            f"model card {card_path}: test_time fused_classes {list(fused)!r} is not supported with fusion "
            f"{RUNNING!r} (this build fuses {[CLASS_NAMES[TARGET]]!r})"
        )
    weights = test_time.get("fuse_weights")
    weight = weights.get(CLASS_NAMES[TARGET]) if isinstance(weights, Mapping) else None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < float(weight) < 1.0:
        raise ModelAssetError(
            f"model card {card_path}: test_time fuse_weights must give the running target a weight above 0 "
            f"and below 1, got {weights!r}"
        )
    return float(weight)


def card_path_for(path: Path) -> Path:
    """``x.json`` for ``x.json`` or ``x.onnx`` (or a folder holding exactly one card)."""
    path = Path(path)
    if path.is_dir():
        cards = sorted(path.glob("*.json"))
        if len(cards) != 1:
            raise ModelAssetError(f"{path} holds {len(cards)} model cards; name one")
        return cards[0]
    return path if path.suffix == ".json" else path.with_suffix(".json")


def load_model_card(path: Path | str, verify: bool = True) -> ModelCard:
    """Read the model card for ``path`` (the ``.json`` or the ``.onnx``) and verify the ONNX sha256.

    Raises:
        ModelAssetError: card missing/malformed, ONNX file missing, or its sha256 differs from the card.
    """
    card_path = card_path_for(Path(path))
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelAssetError(f"model card {card_path} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelAssetError(f"model card {card_path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelAssetError(f"model card {card_path} must hold a JSON object")
    card = parse_model_card(card_path, data)
    if not card.onnx_path.is_file():
        raise ModelAssetError(f"model file {card.onnx_path} (named by {card_path.name}) not found")
    if verify:
        actual = sha256_file(card.onnx_path)
        if actual != card.sha256:
            raise ModelAssetError(
                f"model file {card.onnx_path} does not match its card {card_path.name}: "
                f"expected sha256 {card.sha256}, actual {actual} (file modified or card stale)"
            )
    logger.info("Model %s (%s), input %dx%d", card.name, card.version, card.input_hw[1], card.input_hw[0])
    return card


def models_dir() -> Path:
    env = os.environ.get("GUIDANCE_MODELS_DIR")
    return Path(env) if env else MODELS_DIR


def resolve_model(model: str | Path | None = None) -> Path:
    """Path of the card for ``model``: a file/folder path, a shipped model name, or the default."""
    if model:
        p = Path(model)
        if p.exists():
            return card_path_for(p)
        cand = models_dir() / f"{model}.json"
        if cand.exists():
            return cand
        raise ModelAssetError(
            f"model {str(model)!r} not found (neither a path nor a model in {models_dir()})"
        )
    default = models_dir() / f"{DEFAULT_MODEL_NAME}.json"
    if default.exists():
        return default
    cards = sorted(models_dir().glob("*.json"))
    if len(cards) == 1:
        return cards[0]
    raise ModelAssetError(f"no shipped model in {models_dir()} (expected {DEFAULT_MODEL_NAME}.json)")


def make_random_model(
    directory: Path,
    height: int = 256,
    width: int = 256,
    *,
    seed: int = 0,
    tiny: bool = False,
    name: str | None = None,
    include_argmax: bool = True,
    alternate: bool = False,
    instrument_weight: float = 0.0,
    running_target: float = 0.0,
) -> Path:
    """Write a randomly initialised network of the shipped family (ONNX + card + ``.pt`` state dict).

    Stands in for the trained model in tests and benchmarks until one is shipped. Needs torch and onnx
    (the ``train`` extra). ``alternate``: exported with alternating views (:mod:`engines.views`), the
    instrument fused too at ``instrument_weight`` > 0. ``running_target`` > 0: exported with a running
    target, the previous average weighted that. Returns the card path.
    """
    try:
        import torch

        from engines.models import unet
    except ImportError as exc:
        raise ModelAssetError(
            f"making a random model needs torch and onnx (pip install 'guidance[train]'): {exc}"
        ) from exc
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = unet.TINY_CONFIG if tiny else unet.UNetConfig()
    name = name or f"random-{'tiny' if tiny else 'unet'}-{height}x{width}-s{seed}"
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = unet.build_model(config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    info = unet.CardInfo(
        name=name,
        version="0.0.0-random",
        training={"data": "none (random initialisation, stand-in until the trained model ships)"},
        limits=["random weights: outputs are meaningless"],
    )
    _, card_path = unet.export_model_asset(
        model,
        directory,
        info,
        height=height,
        width=width,
        include_argmax=include_argmax,
        alternate=alternate,
        instrument_weight=instrument_weight,
        running_target=running_target,
    )
    torch.save(model.state_dict(), card_path.with_suffix(".pt"))
    return card_path
