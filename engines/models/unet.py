"""A light U-Net with depthwise-separable convolutions for needle / catheter and target segmentation.

Decisions (also recorded in the model card):

* Input ``(N, 1, H, W)`` float32 NCHW, one channel: the current frame normalised by
  :func:`engines.models.preprocess.normalize`. No previous-frame difference channel: single-frame input
  works for still images, folders and the first frame of a stream, and temporal smoothing is done by the
  interpretation (tip filter) instead.
* Output: logits ``(N, 3, H, W)`` over :data:`engines.base.CLASS_NAMES` (background, instrument, target).
  The exported ONNX graph may also carry ``labels`` (``(N, H, W)`` uint8 argmax) and ``instrument_prob``
  (``(N, H, W)`` float32 softmax of the instrument class) so backends need no numpy post-processing.
* Thin structures: the first stage works at full resolution (a dense 3x3 stem, then a depthwise-separable
  block) and its features are skipped straight to a full-resolution decoder stage, so a 2-3 px wide needle
  is never only seen at a coarse scale. The bottleneck uses dilated depthwise convs for context.
* Training-only auxiliary head: a full-resolution tip heatmap (:meth:`UNet.forward_with_aux`), which pulls
  the decoder towards the needle tip; it is not exported.
* Optional instrument-presence head (``presence_head``): one logit per frame, "is an instrument in this
  frame", from pooled features (mean and max of the bottleneck, max of the last decoder stage) through a
  small MLP. The segmentation decides *where*, pixel by pixel; this decides *whether* with the whole
  frame in view. Exported as ``instrument_present`` (sigmoid) and, with a calibrated
  ``presence_threshold``, used in the graph to clear the instrument class on frames it scores below that
  threshold (:class:`_ExportWrapper`), so every backend gets the same gated labels.

Compute: :func:`count_macs` counts multiply-accumulates with forward hooks (conv, transposed conv,
linear). The default configuration is 0.39 GMAC per 256x256 frame (the presence head adds 9 kMAC).

torch is imported at module level here: this module is only imported with the ``train`` extra installed
or by the torch backend.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from engines import views
from engines.base import CLASS_NAMES, INSTRUMENT, TARGET
from engines.models.preprocess import (
    NORMALIZATION_ID,
    PERCENTILE_HIGH,
    PERCENTILE_LOW,
    SINGLE_FRAME_CHANNELS,
    TEMPORAL_CHANNELS,
)

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"
PROB_NAME = "instrument_prob"
PRESENCE_NAME = "instrument_present"
#: Hidden width of the presence head's MLP.
PRESENCE_HIDDEN = 32
CARD_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class UNetConfig:
    """Architecture hyper-parameters (stored in the model card so a checkpoint can be rebuilt).

    Attributes:
        in_channels: 1 (current frame only) or 2 (a temporal model: the current frame and its difference
            from the previous frame, :data:`engines.models.preprocess.TEMPORAL_CHANNELS`).
        num_classes: 3 (background, instrument, target).
        widths: channels per resolution level, full resolution first; one level per entry, each next
            level at half the resolution of the previous one.
        bottleneck_dilations: dilation of each depthwise conv in the bottleneck (context without cost).
        tip_head: add the training-only tip heatmap head.
        presence_head: add the instrument-presence head (exported; see the module docstring).
    """

    in_channels: int = 1
    num_classes: int = 3
    widths: tuple[int, ...] = (16, 32, 48, 96, 128)
    bottleneck_dilations: tuple[int, ...] = (1, 2, 4)
    tip_head: bool = True
    presence_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> UNetConfig:
        return UNetConfig(
            in_channels=int(data.get("in_channels", 1)),
            num_classes=int(data.get("num_classes", 3)),
            widths=tuple(int(w) for w in data.get("widths", (16, 32, 48, 96, 128))),
            bottleneck_dilations=tuple(int(d) for d in data.get("bottleneck_dilations", (1, 2, 4))),
            tip_head=bool(data.get("tip_head", True)),
            presence_head=bool(data.get("presence_head", False)),
        )


def channel_meaning(config: UNetConfig) -> tuple[str, ...]:
    """The card's ``input.channel_meaning`` for ``config`` (a clear error for an input it cannot say)."""
    if config.in_channels == 1:
        return SINGLE_FRAME_CHANNELS
    if config.in_channels == 2:
        return TEMPORAL_CHANNELS
    raise ValueError(f"no channel meaning for {config.in_channels} input channels (1 or 2)")


#: A tiny configuration for tests (fast to build, run and export).
TINY_CONFIG = UNetConfig(widths=(4, 8, 8), bottleneck_dilations=(1,), tip_head=True)


class ConvBNReLU(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, k: int = 3, *, stride: int = 1, groups: int = 1, dilation: int = 1
    ):
        pad = dilation * (k // 2)
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class DSConv(nn.Sequential):
    """Depthwise 3x3 (optionally strided / dilated) then pointwise 1x1, each with BN + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__(
            ConvBNReLU(cin, cin, 3, stride=stride, groups=cin, dilation=dilation),
            ConvBNReLU(cin, cout, 1),
        )


class ResidualDS(nn.Module):
    """A depthwise-separable block with an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.body = DSConv(cin, cout, dilation=dilation)
        self.skip: nn.Module = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x) + self.skip(x)
        return out


class UpBlock(nn.Module):
    """Upsample x2 (bilinear), project to the skip's width, concatenate, fuse with a DS block."""

    def __init__(self, cdeep: int, cskip: int):
        super().__init__()
        self.project = ConvBNReLU(cdeep, cskip, 1)
        self.fuse = ResidualDS(2 * cskip, cskip)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.project(deep), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        out: torch.Tensor = self.fuse(torch.cat([up, skip], dim=1))
        return out


class UNet(nn.Module):
    """Light U-Net; ``forward`` returns class logits ``(N, num_classes, H, W)``.

    H and W must be multiples of ``2 ** (len(widths) - 1)``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        w = config.widths
        if len(w) < 2:
            raise ValueError("UNetConfig.widths needs at least two levels")
        self.stem = nn.Sequential(ConvBNReLU(config.in_channels, w[0], 3), ResidualDS(w[0], w[0]))
        self.down = nn.ModuleList()
        for cin, cout in itertools.pairwise(w):
            self.down.append(nn.Sequential(DSConv(cin, cout, stride=2), ResidualDS(cout, cout)))
        self.bottleneck = nn.Sequential(
            *(ResidualDS(w[-1], w[-1], dilation=d) for d in config.bottleneck_dilations)
        )
        self.up = nn.ModuleList(UpBlock(w[i + 1], w[i]) for i in reversed(range(len(w) - 1)))
        self.head = nn.Conv2d(w[0], config.num_classes, 1)
        self.tip: nn.Module | None = nn.Conv2d(w[0], 1, 1) if config.tip_head else None
        self.presence: nn.Module | None = (
            nn.Sequential(
                nn.Linear(2 * w[-1] + w[0], PRESENCE_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Linear(PRESENCE_HIDDEN, 1),
            )
            if config.presence_head
            else None
        )
        self._init_weights()

    @property
    def stride(self) -> int:
        return int(2 ** (len(self.config.widths) - 1))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Start with a background prior so early training is not swamped by false instrument pixels.
        if self.head.bias is not None:
            with torch.no_grad():
                self.head.bias.copy_(torch.tensor([2.0] + [0.0] * (self.config.num_classes - 1)))
        if self.tip is not None and isinstance(self.tip, nn.Conv2d) and self.tip.bias is not None:
            nn.init.constant_(self.tip.bias, -4.0)

    def _encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(last decoder stage, bottleneck output)``."""
        skips: list[torch.Tensor] = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        deep: torch.Tensor = self.bottleneck(skips.pop())
        y = deep
        for up in self.up:
            y = up(y, skips.pop())
        return y, deep

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_decode(x)[0]

    def _presence_logit(self, f: torch.Tensor, deep: torch.Tensor) -> torch.Tensor | None:
        if self.presence is None:
            return None
        pooled = torch.cat([deep.mean(dim=(2, 3)), deep.amax(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.presence(pooled)[:, 0]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out

    def forward_with_presence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, presence logit (N,) or None)``: what inference and export need."""
        f, deep = self._encode_decode(x)
        logits: torch.Tensor = self.head(f)
        return logits, self._presence_logit(f, deep)

    def forward_with_aux(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(logits, tip heatmap logits or None, presence logit (N,) or None)`` (training)."""
        f, deep = self._encode_decode(x)
        tip = self.tip(f) if self.tip is not None else None
        logits: torch.Tensor = self.head(f)
        return logits, tip, self._presence_logit(f, deep)


class _ViewWrapper(nn.Module):
    """A :class:`UNet` run in other views: ``config`` and ``presence`` are the wrapped network's, so callers
    (calibration, export, the torch backend) treat the wrapper as the network it wraps."""

    def __init__(self, model: UNet):
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def presence(self) -> nn.Module | None:
        return self.model.presence


class MirrorEnsemble(_ViewWrapper):
    """A network averaged with its left-right mirror: ``0.5 * (f(x) + flip(f(flip(x))))`` on the logits.

    Test-time mirroring, as nnU-Net does by default at inference. Both views run as one batch of two, so
    it costs two network passes per frame: twice the MACs, and on the 2-core CPU here ONNX Runtime p50
    15.2 ms against 7.6 ms (``guidance bench engines --versus``). The result is exactly
    mirror-equivariant: a mirrored frame gives the mirrored label map. The network was trained with
    horizontal flips (both modalities), so both views are frames it knows; vertical flips are left out,
    because ultrasound has a depth direction (an acoustic shadow falls below its reflector) and was not
    trained upside down (averaging one in cut ultrasound instrument Dice from 0.90 to 0.84 on validation).

    What it buys (the runs file has the tables): on the 48 validation sequences per modality every
    figure the shipping rule compares improved (instrument and target Dice, false detections, tip p95),
    and held-out Dice and tip p95 improved a little (+0.004 to +0.008 Dice). It was tried against the one
    failure left, opaque vessels at low dose taken for a catheter with instrument probability 1.0, where
    no threshold helps. On a first development set of that corner false detections fell from 10 to 2 of
    596 frames; on a second draw (``guidance evaluate --scenario low-dose-vessels``) they rose from 14 to
    33, one new sequence flagged on 26 of its 30 frames. Counted in sequences it failed fewer in every
    set, counted in frames it did not: not a fix.

    Calibrate for it (``guidance calibrate --mirror``): the operating point moves with the averaged logits.
    The shipped CPU model does not use it (twice the 0.39 GMAC is over the CPU tier's budget of about
    0.5 GMAC per frame); ``assets/models/candidates/s37-mirror`` does.

    ``config``, ``presence`` and ``forward_with_presence`` mirror the wrapped :class:`UNet`'s so callers
    (calibration, export, the torch backend) treat it as the network it wraps.
    """

    @staticmethod
    def _views(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.flip(x, dims=[3])], dim=0)

    @staticmethod
    def _merge(both: torch.Tensor, n: int) -> torch.Tensor:
        return 0.5 * (both[:n] + torch.flip(both[n:], dims=[3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._merge(self.model(self._views(x)), x.shape[0])

    def forward_with_presence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mirror-averaged logits, mean presence logit of the two views or None)``."""
        n = x.shape[0]
        logits, presence = self.model.forward_with_presence(self._views(x))
        return self._merge(logits, n), None if presence is None else 0.5 * (presence[:n] + presence[n:])


class AlternatingMirror(_ViewWrapper):
    """One network pass per frame, the view alternating between frames; the target fused over two frames.

    The graph takes the frame, whether this frame's view is mirrored (``view_mirrored``: 1 or 0), the
    previous frame's target log-odds and the weight they get (``previous_weight``: 0.5, or 0 on a
    stream's first frame). It runs the network once on the frame in that view, puts the logits back in
    the frame's orientation, and replaces the target log-odds (target logit minus background logit) with
    the weighted mean of this frame's and the previous frame's. It outputs those fused logits, and this
    frame's own target log-odds for the next frame. A target moves little between two frames
    (validation: true target masks of consecutive frames overlap with IoU median 1.0, 5th percentile
    0.93). Averaging two views of two frames bought the target what averaging two views of one frame buys
    (:class:`MirrorEnsemble`) at one pass per frame: validation target Dice 0.882 -> 0.895 on 96
    ultrasound sequences (runs file, s45). Averaging two frames in the same view bought a tenth of that:
    the gain is the second view.

    The needle moves on every frame, so its tip must not lag. With ``instrument_weight`` 0 the instrument
    logits are this frame's only; then every other frame's needle comes from the mirrored view alone,
    and the tip shimmers (runs s45, s46: tip jitter p95 +29 % to +81 %). With ``instrument_weight`` > 0
    the instrument log-odds are fused too, the previous frame getting that share (one more state input,
    ``previous_instrument``, and output). A quarter steadied the tip back to the single view's jitter
    without a visible lag; a half lagged a fast catheter by several pixels (runs file, s47).

    The engines keep the state (which view is next, the previous log-odds) and forget it on ``reset()``
    (:class:`engines.views.FusionState`).
    """

    def __init__(self, model: UNet, instrument_weight: float = 0.0) -> None:
        super().__init__(model)
        if not 0.0 <= instrument_weight < 1.0:
            raise ValueError(f"instrument_weight must be in [0, 1), got {instrument_weight}")
        self.instrument_weight = float(instrument_weight)

    @property
    def fuse_instrument(self) -> bool:
        return self.instrument_weight > 0.0

    def forward_with_presence(
        self,
        x: torch.Tensor,
        view_mirrored: torch.Tensor,
        previous_target: torch.Tensor,
        previous_weight: torch.Tensor,
        previous_instrument: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``(fused logits (N, K, H, W), this frame's state outputs, presence logit or None)``.

        The state outputs are this frame's own log-odds (N, H, W) in :func:`engines.views.state_pairs`
        order: the target's, then the instrument's where it is fused."""
        if self.fuse_instrument != (previous_instrument is not None):
            raise ValueError("previous_instrument is needed exactly when the instrument is fused")
        # Both orientations and a select, not a Gather with a column order: Slice(step -1) + Where cost
        # ONNX Runtime a fraction of the 1.1 ms per frame its Gather along the last axis took (profiled).
        mirrored = (view_mirrored > 0.5).view(-1, 1, 1, 1)
        logits, presence = self.model.forward_with_presence(torch.where(mirrored, torch.flip(x, dims=[3]), x))
        logits = torch.where(mirrored, torch.flip(logits, dims=[3]), logits)
        background = logits[:, 0]
        weight = previous_weight.view(-1, 1, 1)
        own_target = logits[:, TARGET] - background
        target = own_target + weight * (previous_target - own_target)
        if previous_instrument is None:
            parts = [logits[:, :TARGET], (background + target).unsqueeze(1), logits[:, TARGET + 1 :]]
            return torch.cat(parts, dim=1), (own_target,), presence
        assert INSTRUMENT + 1 == TARGET
        own_instrument = logits[:, INSTRUMENT] - background
        # previous_weight is 0.5 (or 0): the instrument's share is that scaled to instrument_weight.
        scale = self.instrument_weight / views.FUSE_WEIGHT
        instrument = own_instrument + (scale * weight) * (previous_instrument - own_instrument)
        parts = [
            logits[:, :INSTRUMENT],
            (background + instrument).unsqueeze(1),
            (background + target).unsqueeze(1),
            logits[:, TARGET + 1 :],
        ]
        return torch.cat(parts, dim=1), (own_target, own_instrument), presence

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(fused logits, *this frame's state outputs)``; ``state`` as :meth:`forward_with_presence`
        takes it (:func:`engines.views.state_inputs` order)."""
        fused, own, _ = self.forward_with_presence(x, *state)
        return (fused, *own)


class RunningTarget(_ViewWrapper):
    """One network pass per frame, the plain view; the target log-odds a running average over frames.

    The graph takes the frame, the previous frame's running target log-odds (target logit minus
    background logit) and the weight they get (``previous_weight``: the card's share, or 0 on a stream's
    first frame). It replaces this frame's target log-odds with ``own + w * (previous - own)`` and outputs
    that average both in the logits and as the next frame's state, so the average is exponential: with a
    share of 0.5 the frame itself weighs 0.5, the one before 0.25, and the frame 4 back about 6 %.
    The instrument logits are this frame's only: the needle moves on every frame and its tip must not lag.

    Why: a lesion moves little from one frame to the next, but speckle and noise redraw its border on
    every frame. On calibration's 48 validation sequences per modality, s40's weights at its operating
    point, a share of 0.5 raised target Dice 0.9160 -> 0.9175 (ultrasound) and 0.9229 -> 0.9253
    (fluoroscopy). Longer memories lag a moving target: 0.7 gave ultrasound 0.9178 but fluoroscopy 0.9224,
    0.9 gave 0.9161 and 0.8963 (runs file, s49). It is a fraction of what alternating views buy the target
    (:class:`AlternatingMirror`, ultrasound 0.9212), but it leaves the instrument logits exactly the single
    view's, so the tip neither shimmers nor lags; and it steadies the target contour on screen.

    The engines keep the state and forget it on ``reset()`` (:class:`engines.views.FusionState`
    with ``alternate=False``); a stream that drops frames averages over a longer time.
    """

    def forward_with_presence(
        self, x: torch.Tensor, previous_target: torch.Tensor, previous_weight: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``(logits with the running target (N, K, H, W), (the running target log-odds (N, H, W),),
        presence logit or None)``."""
        logits, presence = self.model.forward_with_presence(x)
        background = logits[:, 0]
        own = logits[:, TARGET] - background
        target = own + previous_weight.view(-1, 1, 1) * (previous_target - own)
        parts = [logits[:, :TARGET], (background + target).unsqueeze(1), logits[:, TARGET + 1 :]]
        return torch.cat(parts, dim=1), (target,), presence

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits, running target log-odds)``; ``state`` is ``(previous_target, previous_weight)``."""
        fused, own, _ = self.forward_with_presence(x, *state)
        return (fused, *own)


def first_frame_state(
    height: int, width: int, fuse_instrument: bool = False, alternate: bool = True
) -> tuple[torch.Tensor, ...]:
    """The state inputs (:func:`engines.views.state_inputs` order) of a stream's first frame for
    :class:`AlternatingMirror` (``alternate``) or :class:`RunningTarget` (batch 1): plain view, nothing to
    fuse with (weight 0)."""
    zeros = torch.zeros((1, height, width), dtype=torch.float32)
    if not alternate:
        return (zeros, torch.zeros(1))
    base = (torch.zeros(1), zeros, torch.zeros(1))
    return (*base, zeros.clone()) if fuse_instrument else base


#: What the model card's ``test_time`` block says when the graph alternates the mirrored view.
ALTERNATE_NOTE = (
    "one network pass per frame, the view alternating (frame as it is, next frame mirrored, ...); the "
    "target log-odds (target minus background logit) are the mean of this frame's and the previous "
    "frame's, whose view was the other; instrument logits are this frame's only. State inputs "
    "view_mirrored, previous_target, previous_weight; state output target_log_odds"
)


def running_note(share: float) -> str:
    """The card's ``test_time.notes`` of a running-target export."""
    return (
        "one network pass per frame, the plain view; the target log-odds (target minus background logit) "
        f"are a running average over the frames: the previous average weighted {share:g}, this frame's "
        f"own {1 - share:g}; instrument logits are this frame's only. State inputs previous_target, "
        "previous_weight (0 on a stream's first frame); state output target_log_odds (the average)"
    )


def alternate_note(instrument_weight: float) -> str:
    """The card's ``test_time.notes`` of an alternating-view export."""
    if instrument_weight <= 0.0:
        return ALTERNATE_NOTE
    return (
        "one network pass per frame, the view alternating (frame as it is, next frame mirrored, ...); the "
        "target log-odds (target minus background logit) are the mean of this frame's and the previous "
        "frame's, whose view was the other; the instrument log-odds are fused the same way with the "
        f"previous frame's weighted {instrument_weight:g} (this frame's {1 - instrument_weight:g}). State "
        "inputs view_mirrored, previous_target, previous_weight, previous_instrument; state outputs "
        "target_log_odds, instrument_log_odds"
    )


#: What the model card's ``test_time`` block says when the graph averages the mirrored view.
MIRROR_NOTE = (
    "logits averaged with those of the left-right mirrored frame (mirrored back), in the graph: two "
    "network passes per frame, one batch of two"
)


def build_model(config: UNetConfig | Mapping[str, Any] | None = None) -> UNet:
    """Build the network from a :class:`UNetConfig` (or its dict form, e.g. from a model card)."""
    if config is None:
        config = UNetConfig()
    elif not isinstance(config, UNetConfig):
        config = UNetConfig.from_dict(config)
    return UNet(config)


# ---------------------------------------------------------------------------------------- compute counter
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass at ``input_shape`` (N, C, H, W), counted with hooks.

    Counted: ``Conv2d`` (``Cout * Hout * Wout * Cin/groups * kh * kw``), ``ConvTranspose2d``
    (``Cin * Hin * Win * Cout/groups * kh * kw``) and ``Linear`` (``in * out`` per row). Per-element ops
    (BN, ReLU, add, interpolation) are not MACs and are ignored, as is the bias.
    """
    total = 0

    def conv_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def convt_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.ConvTranspose2d)
        kh, kw = m.kernel_size
        total += inp[0].numel() * (m.out_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(convt_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(tuple(input_shape), dtype=torch.float32)
            if isinstance(model, UNet):  # everything inference runs, the presence head included
                model.forward_with_presence(x)
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------- ONNX export
class _ExportWrapper(nn.Module):
    """Adds argmax labels and the instrument softmax to the graph."""

    def __init__(
        self,
        model: nn.Module,
        include_argmax: bool,
        instrument_logit_bias: float = 0.0,
        target_logit_bias: float = 0.0,
        presence_threshold: float = 0.0,
        *,
        mirror: bool = False,
        alternate: bool = False,
        instrument_weight: float = 0.0,
        running_target: float = 0.0,
    ):
        super().__init__()
        if sum((mirror, alternate, running_target > 0.0)) > 1:
            raise ValueError(
                "mirror (two views per frame), alternate (one view per frame) and running_target (the plain "
                "view, the target averaged over frames) exclude each other"
            )
        if not 0.0 <= running_target < 1.0:
            raise ValueError(f"running_target must be in [0, 1), got {running_target}")
        if mirror or alternate or running_target:
            if not isinstance(model, UNet):
                raise TypeError(f"an export with test-time views needs a UNet, got {type(model).__name__}")
            model = (
                MirrorEnsemble(model)
                if mirror
                else AlternatingMirror(model, instrument_weight)
                if alternate
                else RunningTarget(model)
            )
        if instrument_weight and not alternate:
            raise ValueError("instrument_weight is a weight of alternating views (alternate=True)")
        self.alternate = alternate
        self.stateful = alternate or running_target > 0.0
        self.model = model
        self.include_argmax = include_argmax
        self.with_presence = include_argmax and getattr(model, "presence", None) is not None
        self.presence_threshold = float(presence_threshold)
        n = int(getattr(getattr(model, "config", None), "num_classes", 3))
        per_class = ([0.0, float(instrument_logit_bias), float(target_logit_bias)] + [0.0] * n)[:n]
        self.shift: torch.Tensor | None = (
            torch.tensor(per_class, dtype=torch.float32).view(1, n, 1, 1) if any(per_class) else None
        )

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        presence: torch.Tensor | None = None
        own: tuple[torch.Tensor, ...] = ()
        if self.stateful:
            assert isinstance(self.model, AlternatingMirror | RunningTarget)
            fuse = isinstance(self.model, AlternatingMirror) and self.model.fuse_instrument
            assert len(state) == len(views.state_inputs(fuse, self.alternate))
            logits, own, presence = self.model.forward_with_presence(x, *state)
            presence = presence if self.with_presence else None
        elif self.with_presence:
            assert isinstance(self.model, UNet | MirrorEnsemble)
            logits, presence = self.model.forward_with_presence(x)
        else:
            logits = self.model(x)
        if not self.include_argmax:
            return (logits, *own)
        decide = logits if self.shift is None else logits - self.shift
        # Both written as element-wise maps over the class planes instead of ArgMax/Softmax on the
        # class axis: in NCHW, ONNX Runtime's CPU Softmax(axis=1) transposes and took 16 % of the whole
        # network's time at 256x256, ArgMax another 3 %; the plane-wise forms cost a fraction of that.
        # Same results: strict ">" keeps the first maximum like argmax, and
        # softmax_1 = 1 / sum_c exp(l_c - l_1) (exp overflow gives inf, hence 0, as softmax would).
        # Scalars broadcast (full-size constant planes would be folded into 330 KB of initialisers).
        gt = decide[:, 1] > decide[:, 0]
        best = torch.where(gt, decide[:, 1], decide[:, 0])
        labels = gt.to(torch.uint8)
        for c in range(2, decide.shape[1]):
            gt = decide[:, c] > best
            best = torch.where(gt, decide[:, c], best)
            labels = torch.where(gt, c, labels)
        denom = torch.exp(logits[:, 0] - logits[:, 1]) + 1.0
        for c in range(2, logits.shape[1]):
            denom = denom + torch.exp(logits[:, c] - logits[:, 1])
        prob = torch.reciprocal(denom)
        if presence is None:
            return logits, labels, prob, *own
        present = torch.sigmoid(presence)
        if self.presence_threshold > 0.0:
            # The gate: a frame the presence head scores below the threshold has no instrument pixels.
            gate = (present < self.presence_threshold).view(-1, 1, 1) & (labels == 1)
            labels = torch.where(gate, 0, labels)
        return logits, labels, prob, present, *own


def output_spec(
    height: int,
    width: int,
    include_argmax: bool,
    num_classes: int = 3,
    *,
    presence: bool = False,
    alternate: bool = False,
    fuse_instrument: bool = False,
    running_target: bool = False,
) -> list[dict[str, Any]]:
    """The ``output.tensors`` block of the model card for an export with these options."""
    out: list[dict[str, Any]] = [
        {"name": LOGITS_NAME, "shape": [1, num_classes, height, width], "dtype": "float32"},
    ]
    if include_argmax:
        out.append({"name": LABELS_NAME, "shape": [1, height, width], "dtype": "uint8"})
        out.append({"name": PROB_NAME, "shape": [1, height, width], "dtype": "float32"})
        if presence:
            out.append({"name": PRESENCE_NAME, "shape": [1], "dtype": "float32"})
    if alternate or running_target:
        for _, name in views.state_pairs(fuse_instrument):
            out.append({"name": name, "shape": [1, height, width], "dtype": "float32"})
    return out


def state_input_spec(
    height: int, width: int, fuse_instrument: bool = False, alternate: bool = True
) -> list[dict[str, Any]]:
    """The card's ``test_time.state_inputs`` of an alternating-view (or, ``alternate`` False, a
    running-target) export (see :mod:`engines.views`)."""
    plane = [1, height, width]
    shapes = {views.VIEW_MIRRORED: [1], views.PREVIOUS_WEIGHT: [1]}
    return [
        {"name": name, "shape": shapes.get(name, plane), "dtype": "float32"}
        for name in views.state_inputs(fuse_instrument, alternate)
    ]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    height: int,
    width: int,
    include_argmax: bool = True,
    instrument_logit_bias: float = 0.0,
    target_logit_bias: float = 0.0,
    presence_threshold: float = 0.0,
    mirror: bool = False,
    alternate: bool = False,
    instrument_weight: float = 0.0,
    running_target: float = 0.0,
) -> Path:
    """Export ``model`` to ONNX with a fixed ``(1, C, height, width)`` input named ``image``.

    Outputs: ``logits`` (1, K, H, W) float32, and with ``include_argmax`` also ``labels`` (1, H, W) uint8
    (argmax over classes) and ``instrument_prob`` (1, H, W) float32 (softmax of class 1). The model is
    exported in eval mode (BatchNorm folded into the convolutions by constant folding) and the file is
    checked with ``onnx.checker``. ``instrument_logit_bias`` (>= 0) is subtracted from the instrument logit
    before the in-graph argmax only (``logits`` and ``instrument_prob`` are unchanged): an operating point
    that trades a little instrument recall for far fewer false instrument pixels. ``target_logit_bias``
    is subtracted from the target logit the same way (negative: a larger target). A model with a presence
    head also outputs ``instrument_present`` (1,) float32, and with ``presence_threshold`` > 0 its
    ``labels`` have no instrument on frames scored below it. With ``mirror`` the graph runs the network
    on the frame and its mirror image and averages the logits (:class:`MirrorEnsemble`); the input and
    outputs keep their shapes. With ``alternate`` it is :class:`AlternatingMirror`: three more inputs
    (``view_mirrored``, ``previous_target``, ``previous_weight``) and one more output (``target_log_odds``),
    see :mod:`engines.views`; with ``instrument_weight`` > 0 as well the instrument is fused too, with one
    more state input (``previous_instrument``) and output (``instrument_log_odds``). With
    ``running_target`` (the previous average's share, > 0) it is :class:`RunningTarget`: two more inputs
    (``previous_target``, ``previous_weight``) and the output ``target_log_odds``. Returns the path.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_ch = int(getattr(getattr(model, "config", None), "in_channels", 1))
    was_training = model.training
    model.eval()
    wrapper = _ExportWrapper(
        model,
        include_argmax,
        instrument_logit_bias,
        target_logit_bias,
        presence_threshold,
        mirror=mirror,
        alternate=alternate,
        instrument_weight=instrument_weight,
        running_target=running_target,
    ).eval()
    names = [LOGITS_NAME, LABELS_NAME, PROB_NAME] if include_argmax else [LOGITS_NAME]
    if wrapper.with_presence:
        names.append(PRESENCE_NAME)
    inputs: tuple[torch.Tensor, ...] = (torch.zeros((1, in_ch, height, width), dtype=torch.float32),)
    input_names = [INPUT_NAME]
    if wrapper.stateful:
        fuse_instrument = instrument_weight > 0.0
        names += [out for _, out in views.state_pairs(fuse_instrument)]
        inputs += first_frame_state(height, width, fuse_instrument, alternate)
        input_names += list(views.state_inputs(fuse_instrument, alternate))
    try:
        # The TorchScript exporter (dynamo=False) is deprecated but needs no extra package (the dynamo
        # exporter needs onnxscript) and handles this plain conv graph exactly; its warning is expected.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                wrapper,
                inputs,
                str(path),
                input_names=input_names,
                output_names=names,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    onnx.checker.check_model(str(path))
    logger.info(
        "Exported ONNX model to %s (opset %d, %dx%d%s)",
        path,
        opset,
        width,
        height,
        ", mirrored" if mirror else ", alternating views" if alternate else "",
    )
    return path


# ---------------------------------------------------------------------------------------- model card
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


NORMALIZATION_CARD: dict[str, Any] = {
    "id": NORMALIZATION_ID,
    "function": "engines.models.preprocess.to_input",
    "grayscale": "colour (H,W,3|4) -> luminance 0.299 R + 0.587 G + 0.114 B; alpha dropped; (H,W,1) squeezed",
    "uint8": "x / 255",
    "uint16": (
        f"per-frame percentile stretch: (x - p{PERCENTILE_LOW:g}) / "
        f"max(p{PERCENTILE_HIGH:g} - p{PERCENTILE_LOW:g}, 1), clipped to [0, 1] "
        "(also for other integer types wider than 8 bits)"
    ),
    "float": "taken as already in [0, 1]; clipped",
    "resize": "to (height, width): cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging; labels back "
    "with nearest neighbour, probabilities with linear",
    "mean": 0.0,
    "std": 1.0,
}


@dataclass(frozen=True, slots=True)
class CardInfo:
    """Free-text and measured parts of a model card (see :func:`write_model_card`)."""

    name: str
    version: str
    training: Mapping[str, Any] = field(default_factory=dict)
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    intended_use: str = (
        "Research prototype: segmentation of a straight needle / catheter (instrument) and a round target "
        "in 2-D ultrasound and fluoroscopy frames to draw a guidance overlay. Not a medical device; the "
        "clinician always sees the raw image."
    )
    limits: Sequence[str] = ()


def write_model_card(
    path: str | Path,
    *,
    info: CardInfo,
    onnx_path: str | Path,
    config: UNetConfig,
    height: int,
    width: int,
    include_argmax: bool,
    opset: int = 17,
    macs: int | None = None,
    parameters: int | None = None,
    instrument_logit_bias: float = 0.0,
    target_logit_bias: float = 0.0,
    presence_threshold: float = 0.0,
    mirror: bool = False,
    alternate: bool = False,
    instrument_weight: float = 0.0,
    running_target: float = 0.0,
) -> dict[str, Any]:
    """Write the JSON model card next to the ONNX file and return it as a dict.

    Fields: ``name``, ``version``, ``classes`` (ordered; index = label value), ``input`` (height, width,
    channels, layout "NCHW", dtype "float32", name), ``normalization`` (how raw pixels become the input),
    ``output`` (kind, names, shapes), ``architecture`` (config, MACs, parameters), ``training``,
    ``evaluation``, ``onnx`` (file name, opset, sha256), ``intended_use``, ``limits``, and with
    ``mirror`` or ``alternate`` a ``test_time`` block (what the graph averages, passes and MACs per frame,
    and for ``alternate`` its fused classes, their weights, its state inputs and outputs).
    """
    onnx_path = Path(onnx_path)
    with_presence = include_argmax and config.presence_head
    fuse_instrument = alternate and instrument_weight > 0.0
    tensors = output_spec(
        height,
        width,
        include_argmax,
        config.num_classes,
        presence=with_presence,
        alternate=alternate,
        fuse_instrument=fuse_instrument,
        running_target=running_target > 0.0,
    )
    test_time: dict[str, Any] = {}
    if mirror:
        test_time = {
            "mirror": "horizontal",
            "notes": MIRROR_NOTE,
            "passes_per_frame": 2,
            "macs_per_frame": None if macs is None else 2 * macs,
            "gmacs_per_frame": None if macs is None else round(2 * macs / 1e9, 4),
        }
    elif alternate:
        test_time = {
            "mirror": views.ALTERNATE,
            "fused_classes": [
                CLASS_NAMES[c] for c in ((INSTRUMENT, TARGET) if fuse_instrument else (TARGET,))
            ],
            "fuse_weights": {
                CLASS_NAMES[TARGET]: views.FUSE_WEIGHT,
                **({CLASS_NAMES[INSTRUMENT]: instrument_weight} if fuse_instrument else {}),
            },
            "notes": alternate_note(instrument_weight if fuse_instrument else 0.0),
            "passes_per_frame": 1,
            "macs_per_frame": macs,
            "gmacs_per_frame": None if macs is None else round(macs / 1e9, 4),
            "state_inputs": state_input_spec(height, width, fuse_instrument),
            "state_output": views.TARGET_LOG_ODDS,
            "state_outputs": [out for _, out in views.state_pairs(fuse_instrument)],
        }
    elif running_target > 0.0:
        test_time = {
            "fusion": views.RUNNING,
            "fused_classes": [CLASS_NAMES[TARGET]],
            "fuse_weights": {CLASS_NAMES[TARGET]: running_target},
            "notes": running_note(running_target),
            "passes_per_frame": 1,
            "macs_per_frame": macs,
            "gmacs_per_frame": None if macs is None else round(macs / 1e9, 4),
            "state_inputs": state_input_spec(height, width, alternate=False),
            "state_outputs": [views.TARGET_LOG_ODDS],
        }
    card: dict[str, Any] = {
        "card_format": CARD_FORMAT_VERSION,
        "name": info.name,
        "version": info.version,
        "classes": list(CLASS_NAMES[: config.num_classes]),
        "input": {
            "name": INPUT_NAME,
            "height": height,
            "width": width,
            "channels": config.in_channels,
            "channel_meaning": list(channel_meaning(config)),
            "layout": "NCHW",
            "dtype": "float32",
            "shape": [1, config.in_channels, height, width],
        },
        "normalization": NORMALIZATION_CARD,
        "output": {
            "kind": "semantic_segmentation",
            "names": [t["name"] for t in tensors],
            "tensors": tensors,
            "labels_included": include_argmax,
            "notes": "labels = argmax(logits - instrument_logit_bias on class 1 - target_logit_bias on "
            "class 2, axis=1) as uint8; "
            "instrument_prob = softmax(logits, axis=1)[:, 1]; both computed plane-wise in the graph "
            "(Greater/Where, 1 / sum exp(l_c - l_1)), which is the same arithmetic without the slow "
            "class-axis ArgMax/Softmax kernels",
            "instrument_logit_bias": instrument_logit_bias,
            "target_logit_bias": target_logit_bias,
            **(
                {
                    "presence_threshold": presence_threshold,
                    "presence_notes": "instrument_present = sigmoid(presence logit), one per frame; labels "
                    "hold no instrument on frames where it is below presence_threshold (0: no gate)",
                }
                if with_presence
                else {}
            ),
        },
        "architecture": {
            "family": "U-Net, depthwise-separable convolutions",
            "config": config.to_dict(),
            "macs_per_frame": macs,
            "gmacs_per_frame": None if macs is None else round(macs / 1e9, 4),
            "parameters": parameters,
        },
        **({"test_time": test_time} if test_time else {}),
        "training": dict(info.training),
        "evaluation": dict(info.evaluation),
        "onnx": {"file": onnx_path.name, "opset": opset, "sha256": sha256_file(onnx_path)},
        "intended_use": info.intended_use,
        "limits": list(info.limits),
    }
    path = Path(path)
    path.write_text(
        json.dumps(card, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )
    return card


def _json_default(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_model_card(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


def export_model_asset(
    model: UNet,
    directory: str | Path,
    info: CardInfo,
    *,
    height: int,
    width: int,
    include_argmax: bool = True,
    opset: int = 17,
    instrument_logit_bias: float = 0.0,
    target_logit_bias: float = 0.0,
    presence_threshold: float = 0.0,
    mirror: bool = False,
    alternate: bool = False,
    instrument_weight: float = 0.0,
    running_target: float = 0.0,
) -> tuple[Path, Path]:
    """Export ``<directory>/<name>.onnx`` and write ``<directory>/<name>.json``; return both paths."""
    directory = Path(directory)
    onnx_path = export_onnx(
        model,
        directory / f"{info.name}.onnx",
        opset=opset,
        height=height,
        width=width,
        include_argmax=include_argmax,
        instrument_logit_bias=instrument_logit_bias,
        target_logit_bias=target_logit_bias,
        presence_threshold=presence_threshold,
        mirror=mirror,
        alternate=alternate,
        instrument_weight=instrument_weight,
        running_target=running_target,
    )
    card_path = directory / f"{info.name}.json"
    write_model_card(
        card_path,
        info=info,
        onnx_path=onnx_path,
        config=model.config,
        height=height,
        width=width,
        include_argmax=include_argmax,
        opset=opset,
        macs=count_macs(model, (1, model.config.in_channels, height, width)),
        parameters=count_parameters(model),
        instrument_logit_bias=instrument_logit_bias,
        target_logit_bias=target_logit_bias,
        presence_threshold=presence_threshold,
        mirror=mirror,
        alternate=alternate,
        instrument_weight=instrument_weight,
        running_target=running_target,
    )
    return onnx_path, card_path


def export_test_model(
    directory: str | Path,
    *,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    include_argmax: bool = True,
    name: str = "tiny-random",
) -> tuple[Path, Path]:
    """Export a randomly initialised tiny model + card into ``directory`` (for tests; ~0.1 s).

    Its outputs are meaningless but have the shipped model's names, dtypes and layout.
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(TINY_CONFIG)
    finally:
        torch.random.set_rng_state(gen_state)
    info = CardInfo(
        name=name,
        version="0.0.0-test",
        training={"data": "none (random initialisation, for tests only)"},
        limits=["random weights: outputs are meaningless"],
    )
    return export_model_asset(
        model, directory, info, height=height, width=width, include_argmax=include_argmax
    )
