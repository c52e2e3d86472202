"""Training of the segmentation network on the project's own phantoms (needs the ``train`` extra: torch).

Data: every sample is a frame of a simulated sequence from :mod:`guidance.phantoms` (ultrasound, and
fluoroscopy once that phantom exists: :func:`available_modalities` takes whatever ``make_phantom``
accepts). Each sequence draws its own varied configuration from its seed. Training sequence seeds come
from :data:`TRAIN_SEED_RANGE`, validation seeds from :data:`VALIDATION_SEED_BASE` and the held-out
evaluation seeds (:mod:`guidance.evaluation`) from a range below both, so no evaluation sequence is ever
seen in training.

Needle emphasis (the thin, faint, partly out-of-plane instrument is the hard class):

* sampling: frames with an instrument are drawn with probability ``needle_fraction``; crops are centred on
  an instrument pixel (or its tip) 45 % of the time, on the target a quarter, anywhere otherwise (so
  collimator corners, bone and distractor lines are seen as background); a share of ultrasound sequences
  is forced to carry bone or needle-like distractors (``hard_negative_fraction``), and another share a
  hyper- or iso-echoic lesion (``rare_target_fraction``);
* loss: cross-entropy (instrument up-weighted) + soft Dice (instrument, target) + Tversky on the instrument
  (false negatives weighted more than false positives, for recall) + soft clDice on the instrument
  (connectivity of the thin shaft) + a training-only tip-heatmap head;
* an exponential moving average of the weights is what gets validated and exported.

Augmentation (numpy/cv2, per sample): random affine (rotation, zoom, shift), flips (horizontal; vertical
as well for fluoroscopy), gain, gamma, offset, Gaussian blur, additive and multiplicative noise, crops.

Reproducibility: python, numpy and torch are seeded from ``seed``; deterministic torch algorithms are
switched on (cheap on CPU). With ``steps`` set the run is bit-for-bit repeatable on the same machine; with
only ``minutes`` set the learning-rate schedule follows the wall clock, so the number of steps (and hence
the weights) depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from engines.base import INSTRUMENT, TARGET
from engines.models.preprocess import normalize, resize, temporal_input
from engines.models.unet import (
    CardInfo,
    MirrorEnsemble,
    UNet,
    UNetConfig,
    build_model,
    count_macs,
    export_model_asset,
    sha256_file,
)
from guidance.phantoms import VALIDATION_SEED_BASE, PhantomFrame, make_phantom
from guidance.phantoms.ultrasound import TARGET_CONTRAST

logger = logging.getLogger(__name__)

#: Sequence seeds used for training are drawn from this half-open range.
TRAIN_SEED_RANGE = (1_000_000, 2_000_000_000)
#: Frames per sequence a training sample is drawn from (about 20 s at 30 fps: several insertion cycles).
FRAMES_PER_SEQUENCE = 600
DEFAULT_MODEL_NAME = "guidance-unet"
MODALITIES = ("us", "fluoro")


class TrainingError(RuntimeError):
    """Training cannot run (no phantom available, bad configuration); one readable line."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One training run. ``steps`` (when set) fixes the run length; otherwise ``minutes`` does."""

    modalities: tuple[str, ...] = MODALITIES
    minutes: float = 40.0
    steps: int | None = None
    seed: int = 0
    batch_size: int = 8
    crop: int = 192
    image_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    ema_decay: float = 0.99
    model: UNetConfig = field(default_factory=UNetConfig)
    needle_fraction: float = 0.7  # 30 % instrument-free frames: false detections are the costlier error
    crop_on_instrument: float = 0.45
    crop_on_target: float = 0.25  # the rest (0.3) are crops anywhere: collimator corners, bone, distractors
    # Share of ultrasound training sequences forced to carry a hard negative (bone or needle-like
    # distractors): with the sampled rates alone, bone and distractor lines were rarely inside a crop
    # and the first shipped model took them for needles (33 % false detections on held-out frames).
    hard_negative_fraction: float = 0.35
    # Share of ultrasound training sequences whose lesion is forced to be hyper- or iso-echoic (even odds).
    # Drawn as in the phantom (60 % hypo) the network learned "target = dark blob" and scored Dice 0 on
    # every held-out hyperechoic lesion, however bright.
    rare_target_fraction: float = 0.4
    # Share of fluoroscopy sequences forced into the corner where the models tracked a vessel as a
    # guidewire: the lowest doses (150-400 quanta, log-uniform) with 2-3 opaque background vessels
    # (attenuation 0.35-0.5). Drawn as in the phantom, under 1 % of sequences land there, and every
    # fluoroscopy false detection on validation came from such a sequence. 0 keeps the generator's
    # stream exactly as it was before this option (runs s11-s15 reproduce).
    fluoro_hard_negative_fraction: float = 0.0
    # Share of ultrasound sequences given point reflectors (wire rows or scattered calcifications, 3-9),
    # half of them at a gain 10-26 dB lower so the tissue goes dark around them, as in a water tank.
    # Models trained without them took the wire cross-sections of a real N-wire calibration recording
    # for needles. 0 keeps the generator's stream as it was.
    point_reflector_fraction: float = 0.0
    # Share of ultrasound sequences (in tissue, not in a water bath) given 1-3 curved specular walls with
    # no shadow: fluid cavities and bowl-shaped interfaces. On the one real curvilinear PLUS frame every
    # model took a straight stretch of such a wall for a needle; the phantom's only curved bright surface
    # was bone, always deep and always shadowed. 0 keeps the generator's stream as it was.
    curved_wall_fraction: float = 0.0
    # Give half of the water-bath sequences 1-2 straight line reflectors that do not reach the border. False
    # keeps the generator's stream as it was.
    bath_lines: bool = False
    pool_size: int = 32
    refresh_every: int = 2  # replace one pooled sequence every N steps
    val_every: int = 25
    val_sequences: int = 4
    val_frames_per_sequence: int = 6
    threads: int = 2
    # "cpu", "cuda" (an error when torch sees none), "cuda:N" or "auto" (CUDA when there is one). The
    # phantoms are synthesised on the CPU either way; on a GPU the network's steps stop being the bottleneck.
    device: str = "cpu"
    # "fp32", or "bf16": the forward pass under autocast to bfloat16 (weights, optimizer, EMA and the loss
    # stay float32). On this project's CPU (AVX512-BF16) oneDNN's bf16 kernels made a batch-8 192x192 step
    # 0.45 -> 0.31 s; with bfloat16's 8 exponent bits no loss scaling is needed. Refused, with the reason,
    # where the device has no native bf16 (it would be emulated, slower than fp32).
    precision: Literal["fp32", "bf16"] = "fp32"
    # loss weights
    w_ce: float = 1.0
    w_dice: float = 1.0
    w_tversky: float = 0.5
    w_cldice: float = 0.5
    w_tip: float = 0.5
    instrument_ce_weight: float = 3.0
    target_ce_weight: float = 1.0
    target_dice_weight: float = 1.0  # relative to the instrument's Dice term
    init_weights: str | None = None  # start from this state_dict (.pt) instead of random weights
    tversky_alpha: float = 0.3  # false-positive weight
    tversky_beta: float = 0.7  # false-negative weight
    tip_sigma_px: float = 2.0
    # Presence head (``model.presence_head``): binary cross-entropy of its per-frame logit against "this
    # crop holds at least ``presence_min_px`` instrument pixels" (20: the interpretation's own minimum).
    w_presence: float = 0.5
    presence_min_px: int = 20
    # Train only what ``init_weights`` lacks (a new head) and keep the rest, BatchNorm statistics included,
    # exactly as loaded: a head added to a validated network then leaves its segmentation untouched.
    freeze_body: bool = False
    # Temporal models (``model.in_channels`` 2): the second channel is the current frame minus the previous
    # one (:func:`engines.models.preprocess.temporal_input`). The previous frame is 1..``max_frame_gap``
    # frames back (a live stream drops frames when the model is slow), and with probability
    # ``first_frame_fraction`` it is the frame itself: a stream's first frame, where the difference is 0.
    max_frame_gap: int = 3
    first_frame_fraction: float = 0.1
    # Distillation from the mirrored view (``--teacher``): a trained network of this architecture, run
    # frozen as :class:`engines.models.unet.MirrorEnsemble` (its logits averaged with its left-right
    # mirror's) on every training crop, and the student's class distribution pulled towards the teacher's
    # by ``w_distill`` * KL(teacher || student) per pixel, beside the loss against the labels. The mirrored
    # view beat the single one on every validation figure but costs two passes (0.78 GMAC, over the CPU
    # budget); distillation tries to buy some of that gain for one pass. Costs a teacher pass of two
    # views per step in training, nothing at inference.
    teacher_weights: str | None = None
    w_distill: float = 1.0

    @property
    def temporal(self) -> bool:
        return self.model.in_channels == 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class TrainResult:
    model: UNet
    steps: int
    seconds: float
    history: tuple[dict[str, float], ...]
    best_metrics: dict[str, float]
    modalities: tuple[str, ...]
    out_dir: Path | None
    hardware: str = "CPU"


# ------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python, numpy and torch; switch on deterministic torch algorithms (cheap on CPU)."""
    # cuBLAS is deterministic only with a fixed workspace, which must be set before its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))  # legacy global state, for third-party code
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    A training step allocates and frees the same activations every time, many of them 5-40 MB. Left to
    its defaults, glibc serves blocks that large with fresh ``mmap`` calls and trims its heap as soon as
    they are freed, so every step pays to fault the pages in again (zeroed by the kernel): on this 2-core VM a
    third of the training process's time was system time, and ``aten::fill_`` of one 38 MB gradient took
    99 ms. With blocks up to 32 MB (glibc's ceiling for this threshold) served from the heap, and the heap
    kept, 50 training steps went from 58 s to 44 s (system time from 24 s to 2.5 s); the arithmetic,
    hence the weights, is unchanged. Measured by ``guidance train --steps 50`` with and without it.

    Returns whether the settings took (glibc only; elsewhere nothing is changed). The process keeps its
    peak heap until it exits, which for a training run is what it needs anyway.
    """
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt differs or is absent
            return False
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        # mallopt returns 1 on success. The mmap threshold must be set before the trim threshold: setting
        # either switches glibc's dynamic adjustment of both off.
        return bool(
            mallopt(_M_MMAP_THRESHOLD, 32 * _MIB)
            and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            and mallopt(_M_TOP_PAD, 512 * _MIB)
        )
    return False


def resolve_device(name: str) -> torch.device:
    """The torch device for ``TrainConfig.device``; a :class:`TrainingError` naming why CUDA is unusable."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown training device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TrainingError(f"training runs on the CPU or an NVIDIA GPU (cuda), not on {device.type!r}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise TrainingError(
            f"--device {name} asked for, but torch {torch.__version__} ({build}) sees no CUDA device; "
            "train with --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX), not by emulation.

    torch has no public query for this; the oneDNN op its own autocast tests use is looked up by name, and
    a torch without it counts as "no" (training then says so and fp32 is used).
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    built = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return bool(built and probe is not None and probe())


def check_precision(precision: str, device: torch.device) -> None:
    """A :class:`TrainingError` naming why ``precision`` cannot train on ``device``; None when it can."""
    if precision == "fp32":
        return
    if precision != "bf16":
        raise TrainingError(f"unknown training precision {precision!r}: use fp32 or bf16")
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise TrainingError(
                f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp32"
            )
        return
    if not cpu_has_native_bf16():
        raise TrainingError(
            "--precision bf16: this CPU has no native bfloat16 instructions (AVX512-BF16 or AMX), so bf16 "
            "would be emulated and slower than fp32; use fp32"
        )


def describe_device(device: torch.device, threads: int) -> str:
    """The hardware line of the model card."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); phantoms on the CPU"
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


def available_modalities(requested: Sequence[str]) -> tuple[str, ...]:
    """The requested modalities whose phantom exists in this build (others skipped with a warning)."""
    out = []
    for m in requested:
        try:
            make_phantom(m, seed=0, width=64, height=64)
        except (ValueError, ImportError, NotImplementedError) as exc:
            logger.warning("No %s phantom available, training without it: %s", m, exc)
            continue
        out.append(m)
    return tuple(out)


# ------------------------------------------------------------------------------------------- samples
def _f32(a: Any) -> npt.NDArray[np.float32]:
    return np.asarray(a, dtype=np.float32)


def _u8(a: Any) -> npt.NDArray[np.uint8]:
    return np.asarray(a, dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class Sample:
    """One network-ready sample: image float32, labels uint8, tip heatmap float32.

    ``image`` is ``(H, W)`` in [0, 1] for a single-frame model, or ``(2, H, W)`` for a temporal one:
    the current plane and its difference from the previous frame's (:func:`temporal_input`).
    """

    image: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    tip: npt.NDArray[np.float32]


def tip_heatmap(
    shape: tuple[int, int], tip: tuple[float, float] | None, sigma: float
) -> npt.NDArray[np.float32]:
    h, w = shape
    if tip is None:
        return np.zeros((h, w), np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    d2 = (xs - np.float32(tip[0])) ** 2 + (ys - np.float32(tip[1])) ** 2
    out: npt.NDArray[np.float32] = np.exp(-d2 / np.float32(2.0 * sigma * sigma)).astype(np.float32)
    return out


def _plane(frame: PhantomFrame, size: int) -> npt.NDArray[np.float32]:
    """The frame's normalised plane at the network input size (the engines' arithmetic)."""
    return resize(normalize(frame.image), size, size)


def frame_to_sample(
    frame: PhantomFrame,
    size: int,
    sigma: float,
    *,
    temporal: bool = False,
    previous: PhantomFrame | None = None,
) -> Sample:
    """A phantom frame at the network input size (no augmentation): what validation/evaluation see.

    ``temporal``: a two-channel sample with ``previous`` as the previous frame (None: a stream's first).
    """
    img = _plane(frame, size)
    lab = frame.labels
    h, w = lab.shape
    tip = frame.tip_px
    if (h, w) != (size, size):
        lab = _u8(cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST))
        if tip is not None:
            tip = (tip[0] * size / w, tip[1] * size / h)
    if temporal:
        img = temporal_input(img, None if previous is None else _plane(previous, size))
    return Sample(img.astype(np.float32), lab.astype(np.uint8), tip_heatmap((size, size), tip, sigma))


def augment(
    frame: PhantomFrame,
    rng: np.random.Generator,
    cfg: TrainConfig,
    previous: PhantomFrame | None = None,
    *,
    temporal: bool = False,
) -> Sample:
    """Augmented crop of ``frame`` (geometry + intensity), ``cfg.crop`` square.

    ``temporal`` makes a two-channel sample (``temporal_input``). The ``previous`` frame gets the same
    geometry, crop and intensity transform, and noise of the same strength but of its own draw (noise is
    independent from frame to frame); without one (a stream's first frame) the difference is 0. A
    single-frame sample takes exactly the random draws it took before temporal models existed, so earlier
    runs reproduce.
    """
    base = frame_to_sample(frame, cfg.image_size, cfg.tip_sigma_px)
    img, lab = base.image, base.labels
    prev = _plane(previous, cfg.image_size) if previous is not None else None
    size = cfg.image_size
    tip = frame.tip_px
    if tip is not None:
        tip = (tip[0] * size / frame.labels.shape[1], tip[1] * size / frame.labels.shape[0])
    fluoro = frame.modality == "fluoro"

    # Geometry: affine about the image centre (rotation, zoom, shift) and flips.
    angle = float(rng.uniform(-25, 25) if fluoro else rng.uniform(-12, 12))
    scale = float(np.exp(rng.uniform(math.log(0.8), math.log(1.3))))
    m = cv2.getRotationMatrix2D((size / 2.0 - 0.5, size / 2.0 - 0.5), angle, scale)
    m[:, 2] = m[:, 2] + rng.uniform(-0.08, 0.08, size=2) * size
    if rng.uniform() < 0.5:  # horizontal flip
        m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
    if fluoro and rng.uniform() < 0.5:  # vertical flip (fluoroscopy has no "depth" direction)
        m = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, size - 1.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
    border = float(rng.uniform(0.0, 0.05))
    img = _f32(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=border))
    if prev is not None:
        prev = _f32(cv2.warpAffine(prev, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=border))
    lab = _u8(cv2.warpAffine(lab, m, (size, size), flags=cv2.INTER_NEAREST, borderValue=0))
    if tip is not None:
        tx, ty = m @ np.array([tip[0], tip[1], 1.0])
        tip = (float(tx), float(ty))

    # Crop: centred on the instrument, the target, or anywhere.
    c = cfg.crop
    if c < size:
        u = rng.uniform()
        ys, xs = np.empty(0, np.intp), np.empty(0, np.intp)
        if u < cfg.crop_on_instrument:
            ys, xs = np.nonzero(lab == INSTRUMENT)
        elif u < cfg.crop_on_instrument + cfg.crop_on_target:
            ys, xs = np.nonzero(lab == TARGET)
        if len(ys):
            k = int(rng.integers(len(ys)))
            if tip is not None and rng.uniform() < 0.3:
                cy, cx = int(tip[1]), int(tip[0])
            else:
                cy, cx = int(ys[k]), int(xs[k])
            cy += int(rng.integers(-c // 4, c // 4 + 1))
            cx += int(rng.integers(-c // 4, c // 4 + 1))
        else:
            cy, cx = (
                int(rng.integers(c // 2, size - c // 2 + 1)),
                int(rng.integers(c // 2, size - c // 2 + 1)),
            )
        y0 = min(max(cy - c // 2, 0), size - c)
        x0 = min(max(cx - c // 2, 0), size - c)
        img = img[y0 : y0 + c, x0 : x0 + c]
        lab = lab[y0 : y0 + c, x0 : x0 + c]
        if prev is not None:
            prev = prev[y0 : y0 + c, x0 : x0 + c]
        if tip is not None:
            tip = (tip[0] - x0, tip[1] - y0)
    if tip is not None and not bool(np.any(lab == INSTRUMENT)):
        tip = None

    # Intensity: gain, gamma, offset, blur, noise (one draw of each setting for both frames).
    planes = [img] if prev is None else [img, prev]
    gamma = np.float32(np.exp(rng.uniform(math.log(0.7), math.log(1.5))))
    gain, offset = np.float32(rng.uniform(0.7, 1.3)), np.float32(rng.uniform(-0.06, 0.06))
    planes = [np.clip(q, 0.0, 1.0) ** gamma * gain + offset for q in planes]
    if rng.uniform() < 0.3:
        sigma = float(rng.uniform(0.4, 1.2))
        planes = [_f32(cv2.GaussianBlur(q, (0, 0), sigma)) for q in planes]
    if rng.uniform() < 0.5:
        sd = rng.uniform(0.02, 0.15)
        planes = [q * (1.0 + rng.normal(0.0, sd, q.shape)).astype(np.float32) for q in planes]
    if rng.uniform() < 0.5:
        sd = rng.uniform(0.005, 0.04)
        planes = [q + rng.normal(0.0, sd, q.shape).astype(np.float32) for q in planes]
    planes = [np.clip(q, 0.0, 1.0).astype(np.float32) for q in planes]
    out = temporal_input(planes[0], planes[1] if prev is not None else None) if temporal else planes[0]
    return Sample(
        np.ascontiguousarray(out), np.ascontiguousarray(lab), tip_heatmap(lab.shape, tip, cfg.tip_sigma_px)
    )


class PhantomSampler:
    """Draws augmented training samples from a rotating pool of phantom sequences.

    The pool holds ``pool_size`` sequences (seeds drawn from :data:`TRAIN_SEED_RANGE` by this sampler's
    generator); one is replaced every ``refresh_every`` batches, so a long run sees thousands of
    sequences while each batch costs only frame synthesis (~1 ms per frame).
    """

    def __init__(self, cfg: TrainConfig, modalities: Sequence[str], seed: int) -> None:
        if not modalities:
            raise TrainingError("no phantom modality is available to train on")
        self.cfg = cfg
        self.modalities = tuple(modalities)
        self.rng = np.random.default_rng([seed, 0x7EA1])
        self.pool: list[Any] = [self._new_sequence() for _ in range(cfg.pool_size)]
        self.batches = 0
        self.sequences_used = len(self.pool)

    def _new_sequence(self) -> Any:
        modality = self.modalities[int(self.rng.integers(len(self.modalities)))]
        seed = int(self.rng.integers(*TRAIN_SEED_RANGE))
        overrides: dict[str, Any] = {}
        if modality == "us" and self.rng.uniform() < self.cfg.hard_negative_fraction:
            if self.rng.uniform() < 0.5:
                overrides["bone"] = True
            else:
                overrides["n_distractors"] = int(self.rng.integers(1, 4))
        if modality == "us" and self.rng.uniform() < self.cfg.rare_target_fraction:
            kind = "hyper" if self.rng.uniform() < 0.5 else "iso"
            overrides["target_kind"] = kind
            overrides["target_contrast"] = float(self.rng.uniform(*TARGET_CONTRAST[kind]))
        if (
            modality == "us"
            and self.cfg.point_reflector_fraction > 0.0
            and self.rng.uniform() < self.cfg.point_reflector_fraction
        ):
            overrides["n_point_reflectors"] = int(self.rng.integers(3, 10))
            overrides["point_layout"] = "rows" if self.rng.uniform() < 0.5 else "scatter"
            look = self.rng.uniform()
            if look < 0.5:
                # A wire phantom in a water tank: black but for the wires (and the needle, if any). No
                # lesion (there is no tissue to hold one) and no bone.
                overrides["water_bath_db"] = float(self.rng.uniform(30.0, 50.0))
                overrides.update(target_kind="none", bone=False, n_distractors=0)
                if self.cfg.bath_lines:
                    # Half of the tanks hold a straight reflector or two that float in the field (a wire in
                    # the image plane, a plate's edge): the needle-like echo of the real N-wire recording.
                    overrides["n_line_reflectors"] = int(self.rng.integers(1, 3)) * int(
                        self.rng.uniform() < 0.5
                    )
            elif look < 0.75:
                overrides["gain_db"] = float(self.rng.uniform(-26.0, -10.0))  # tissue at a tank's gain
        if (
            modality == "us"
            and self.cfg.curved_wall_fraction > 0.0
            and self.rng.uniform() < self.cfg.curved_wall_fraction
            and "water_bath_db" not in overrides
        ):
            overrides["n_curved_walls"] = int(self.rng.integers(1, 4))
        if (
            modality == "fluoro"
            and self.cfg.fluoro_hard_negative_fraction > 0.0
            and self.rng.uniform() < self.cfg.fluoro_hard_negative_fraction
        ):
            overrides["dose_photons"] = float(np.exp(self.rng.uniform(np.log(150.0), np.log(400.0))))
            overrides["n_vessels"] = int(self.rng.integers(2, 4))
            overrides["vessel_mu"] = float(self.rng.uniform(0.35, 0.5))
        size = self.cfg.image_size
        return make_phantom(modality, seed=seed, width=size, height=size, **overrides)

    def _frame(self) -> tuple[PhantomFrame, PhantomFrame | None]:
        """A frame and, for a temporal model, its previous frame (None on a stream's first frame)."""
        want_needle = self.rng.uniform() < self.cfg.needle_fraction
        frame, phantom, index = None, None, 0
        for _ in range(6):
            phantom = self.pool[int(self.rng.integers(len(self.pool)))]
            index = int(self.rng.integers(FRAMES_PER_SEQUENCE))
            frame = phantom.frame(index)
            if frame.instrument_present == want_needle:
                break
        assert frame is not None
        assert phantom is not None
        out: PhantomFrame = frame
        if not self.cfg.temporal:
            return out, None
        if index == 0 or self.rng.uniform() < self.cfg.first_frame_fraction:
            return out, None
        gap = int(self.rng.integers(1, self.cfg.max_frame_gap + 1))
        prev: PhantomFrame = phantom.frame(max(index - gap, 0))
        return out, prev

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images (B,C,c,c) float32, labels (B,c,c) int64, tip heatmaps (B,1,c,c) float32)``."""
        samples = [
            augment(frame, self.rng, self.cfg, previous=prev, temporal=self.cfg.temporal)
            for frame, prev in (self._frame() for _ in range(self.cfg.batch_size))
        ]
        self.batches += 1
        if self.cfg.refresh_every > 0 and self.batches % self.cfg.refresh_every == 0:
            self.pool[int(self.rng.integers(len(self.pool)))] = self._new_sequence()
            self.sequences_used += 1
        return collate(samples)


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples -> ``(images (B,C,H,W), labels (B,H,W) int64, tip heatmaps (B,1,H,W))``."""
    images = np.stack([s.image for s in samples])
    x = torch.from_numpy(images[:, None] if images.ndim == 3 else images)
    y = torch.from_numpy(np.stack([s.labels for s in samples]).astype(np.int64))
    t = torch.from_numpy(np.stack([s.tip for s in samples])[:, None])
    return x, y, t


def validation_set(cfg: TrainConfig, modalities: Sequence[str]) -> list[Sample]:
    """Fixed validation frames (seeds from :data:`VALIDATION_SEED_BASE`, never trained on); a temporal
    model's previous frame is the one just before (a live stream at full rate)."""
    out = []
    for mi, m in enumerate(modalities):
        for k in range(cfg.val_sequences):
            ph = make_phantom(
                m, seed=VALIDATION_SEED_BASE + 1000 * mi + k, width=cfg.image_size, height=cfg.image_size
            )
            step = FRAMES_PER_SEQUENCE // max(cfg.val_frames_per_sequence, 1)
            for j in range(cfg.val_frames_per_sequence):
                index = j * step + 7
                out.append(
                    frame_to_sample(
                        ph.frame(index),
                        cfg.image_size,
                        cfg.tip_sigma_px,
                        temporal=cfg.temporal,
                        previous=ph.frame(index - 1) if cfg.temporal else None,
                    )
                )
    return out


# ------------------------------------------------------------------------------------------- losses
def soft_dice(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice over the whole batch (stable on frames where the class is absent)."""
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def tversky(
    prob: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, eps: float = 1.0
) -> torch.Tensor:
    tp = (prob * target).sum()
    fp = (prob * (1.0 - target)).sum()
    fn = ((1.0 - prob) * target).sum()
    return 1.0 - (tp + eps) / (tp + alpha * fp + beta * fn + eps)


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def _soft_dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def soft_skeleton(x: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Differentiable morphological skeleton (Shit et al., clDice, CVPR 2021)."""
    skel = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def soft_cldice(
    prob: torch.Tensor, target: torch.Tensor, iterations: int = 3, eps: float = 1.0
) -> torch.Tensor:
    """1 - clDice: topology precision/recall of the predicted and true skeletons (inputs (B,1,H,W))."""
    sp, st = soft_skeleton(prob, iterations), soft_skeleton(target, iterations)
    tprec = ((sp * target).sum() + eps) / (sp.sum() + eps)
    tsens = ((st * prob).sum() + eps) / (st.sum() + eps)
    return 1.0 - 2.0 * tprec * tsens / (tprec + tsens)


class SegmentationLoss(nn.Module):
    """CE + Dice (instrument, target) + Tversky (instrument) + clDice (instrument) + tip heatmap BCE."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer(
            "class_weight", torch.tensor([1.0, cfg.instrument_ce_weight, cfg.target_ce_weight])
        )

    def forward(
        self,
        logits: torch.Tensor,
        tip_logits: torch.Tensor | None,
        labels: torch.Tensor,
        tip: torch.Tensor,
        presence_logits: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        weight = self.class_weight
        assert isinstance(weight, torch.Tensor)
        ce = F.cross_entropy(logits, labels, weight=weight)
        prob = torch.softmax(logits, dim=1)
        inst_t = (labels == INSTRUMENT).float()
        targ_t = (labels == TARGET).float()
        p_inst, p_targ = prob[:, INSTRUMENT], prob[:, TARGET]
        wt = cfg.target_dice_weight
        dice = (soft_dice(p_inst, inst_t) + wt * soft_dice(p_targ, targ_t)) / (1.0 + wt)
        tv = tversky(p_inst, inst_t, cfg.tversky_alpha, cfg.tversky_beta)
        cl = soft_cldice(p_inst[:, None], inst_t[:, None]) if cfg.w_cldice > 0 else logits.new_zeros(())
        if tip_logits is not None and cfg.w_tip > 0:
            tip_w = 1.0 + 30.0 * tip
            tip_loss = F.binary_cross_entropy_with_logits(tip_logits, tip, weight=tip_w)
        else:
            tip_loss = logits.new_zeros(())
        if presence_logits is not None and cfg.w_presence > 0:
            present = (inst_t.sum(dim=(1, 2)) >= cfg.presence_min_px).float()
            presence_loss = F.binary_cross_entropy_with_logits(presence_logits, present)
        else:
            presence_loss = logits.new_zeros(())
        if teacher_logits is not None and cfg.w_distill > 0:
            distill = distillation_loss(logits, teacher_logits)
        else:
            distill = logits.new_zeros(())
        total = (
            cfg.w_ce * ce
            + cfg.w_dice * dice
            + cfg.w_tversky * tv
            + cfg.w_cldice * cl
            + cfg.w_tip * tip_loss
            + cfg.w_presence * presence_loss
            + cfg.w_distill * distill
        )
        parts = {
            "loss": float(total.detach()),
            "ce": float(ce.detach()),
            "dice": float(dice.detach()),
            "tversky": float(tv.detach()),
            "cldice": float(cl.detach()),
            "tip": float(tip_loss.detach()),
            "presence": float(presence_loss.detach()),
            "distill": float(distill.detach()),
        }
        return total, parts


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of KL(teacher || student) between the per-pixel class distributions (temperature
    1); zero exactly where the student's distribution is the teacher's. Both ``(N, C, H, W)`` logits."""
    student = F.log_softmax(logits, dim=1)
    teacher = F.log_softmax(teacher_logits.detach(), dim=1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True)
    return kl.sum(dim=1).mean()


# ------------------------------------------------------------------------------------------- metrics
def dice_score(pred: npt.NDArray[np.bool_], true: npt.NDArray[np.bool_]) -> float:
    """Dice of two boolean masks; NaN when both are empty (undefined, not perfect)."""
    s = int(pred.sum()) + int(true.sum())
    return math.nan if s == 0 else 2.0 * int(np.logical_and(pred, true).sum()) / s


def training_step(
    model: UNet,
    loss_fn: SegmentationLoss,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    precision: str = "fp32",
    *,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """One optimisation step on ``batch`` (input, labels, tip heatmap); returns the loss terms.

    With ``precision`` "bf16" the forward pass runs under bfloat16 autocast on the batch's device and the
    loss (softmax, Dice sums, clDice's soft skeleton) is computed in float32 from upcast outputs; the
    gradients reach the float32 weights through autocast's casts, so nothing else changes.

    ``teacher`` (frozen, eval mode): its logits on the same input become the distillation target.
    """
    x, y, tip = batch
    low = precision == "bf16"
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
            teacher_logits = teacher(x).float()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
        logits, tip_logits, presence_logits = model.forward_with_aux(x)
    if low:
        logits = logits.float()
        tip_logits = None if tip_logits is None else tip_logits.float()
        presence_logits = None if presence_logits is None else presence_logits.float()
    loss, parts = loss_fn(logits, tip_logits, y, tip, presence_logits, teacher_logits=teacher_logits)
    terms: dict[str, float] = parts
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
    opt.step()
    return terms


@torch.no_grad()
def validate(
    model: nn.Module, samples: Sequence[Sample], batch: int = 8, presence_min_px: int = 20
) -> dict[str, float]:
    """Pooled Dice of instrument and target over ``samples`` (pixel counts summed over frames), and for a
    model with a presence head the share of frames it classifies right (at 0.5)."""
    model.eval()
    device = next(model.parameters()).device
    with_presence = isinstance(model, UNet) and model.presence is not None
    inter = np.zeros(3)
    total = np.zeros(3)
    right = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        x = collate(chunk)[0].to(device)
        true = np.stack([s.labels for s in chunk])
        if with_presence:
            assert isinstance(model, UNet)
            logits, presence = model.forward_with_presence(x)
            assert presence is not None
            said = (presence > 0).cpu().numpy()
            right += int(np.sum(said == ((true == INSTRUMENT).sum(axis=(1, 2)) >= presence_min_px)))
        else:
            logits = model(x)
        pred = logits.argmax(1).cpu().numpy().astype(np.uint8)
        for c in (INSTRUMENT, TARGET):
            inter[c] += np.logical_and(pred == c, true == c).sum()
            total[c] += (pred == c).sum() + (true == c).sum()
    out = {
        "val_instrument_dice": float(2 * inter[INSTRUMENT] / max(total[INSTRUMENT], 1)),
        "val_target_dice": float(2 * inter[TARGET] / max(total[TARGET], 1)),
    }
    if with_presence:
        out["val_presence_accuracy"] = right / max(len(samples), 1)
    return out


#: The network's first convolution (input channels -> the first width).
_FIRST_CONV = "stem.0.0.weight"


def load_initial_weights(model: UNet, path: str) -> list[str]:
    """Load ``path`` into ``model``; returns the parameter names it lacked (a head new to this run).

    Only a missing presence head is accepted (it starts from its own initialisation); any other mismatch
    is a :class:`TrainingError`. Single-frame weights load into a temporal model: the first convolution's
    weights for the new difference channel start at zero, so the temporal model starts out computing
    exactly what the single-frame one did (the difference channel then learns from there).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = model.state_dict()
        key = _FIRST_CONV
        if key in state and key in own and state[key].shape[1] < own[key].shape[1]:
            w = torch.zeros_like(own[key])
            w[:, : state[key].shape[1]] = state[key]
            state[key] = w
            logger.info("%s: new input channels of %s start at zero", path, key)
        result = model.load_state_dict(state, strict=False)
    except (OSError, RuntimeError, ValueError) as exc:  # shape mismatches are RuntimeErrors
        first = str(exc).strip().splitlines()
        raise TrainingError(f"{path} does not fit this network: {first[-1] if first else exc}") from exc
    foreign = [k for k in result.missing_keys if not k.startswith("presence.")]
    if foreign or result.unexpected_keys:
        raise TrainingError(
            f"{path} does not fit this network: missing {foreign[:4]}, unexpected {result.unexpected_keys[:4]}"
        )
    return list(result.missing_keys)


def load_teacher(cfg: TrainConfig, device: torch.device) -> MirrorEnsemble | None:
    """The frozen mirrored teacher of ``cfg.teacher_weights`` (None without one), on ``device``."""
    if not cfg.teacher_weights:
        return None
    net = build_model(cfg.model)
    missing = load_initial_weights(net, cfg.teacher_weights)
    if missing:
        raise TrainingError(
            f"teacher {cfg.teacher_weights} lacks {', '.join(missing[:4])}: it must be complete"
        )
    for param in net.parameters():
        param.requires_grad_(False)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (in place; stubs lack it)
    teacher = MirrorEnsemble(net).to(device).eval()
    logger.info("Distilling from %s, mirrored (weight %g)", cfg.teacher_weights, cfg.w_distill)
    return teacher


# ------------------------------------------------------------------------------------------- training
def _lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return max(progress / max(warmup, 1e-9), 0.02)
    p = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


class _Ema:
    """Exponential moving average of parameters and buffers (BatchNorm statistics copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for pe, pm in zip(self.model.parameters(), model.parameters(), strict=True):
            if pm.requires_grad:  # frozen ones are equal already; averaging would only add rounding
                pe.mul_(d).add_(pm.detach(), alpha=1.0 - d)
        for be, bm in zip(self.model.buffers(), model.buffers(), strict=True):
            be.copy_(bm)


ProgressFn = Callable[[int, dict[str, float]], None]


def train(
    cfg: TrainConfig,
    out_dir: Path | None = None,
    *,
    progress: bool = True,
    name: str = DEFAULT_MODEL_NAME,
) -> TrainResult:
    """Train a model; with ``out_dir`` write checkpoints, history and the ONNX asset + card there.

    Returns the EMA model in eval mode (the one exported), the number of steps, wall time and history.
    """
    if cfg.steps is None and cfg.minutes <= 0:
        raise TrainingError("give a positive --minutes or --steps")
    seed_everything(cfg.seed, cfg.threads)
    if not keep_freed_memory():
        logger.info(
            "Could not tune the C allocator (not glibc); training runs at the default allocator's pace"
        )
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    hardware = describe_device(device, cfg.threads)
    if cfg.precision != "fp32":
        hardware += f", {cfg.precision} autocast"
    modalities = available_modalities(cfg.modalities)
    if not modalities:
        raise TrainingError(f"none of the phantoms {', '.join(cfg.modalities)} is available")
    model = build_model(cfg.model)
    new: list[str] = []
    if cfg.init_weights:
        new = load_initial_weights(model, cfg.init_weights)
        logger.info("Starting from weights %s%s", cfg.init_weights, " (new: presence head)" if new else "")
    if cfg.freeze_body:
        if not new:
            raise TrainingError("--freeze-body trains only what the --init weights lack; they lack nothing")
        for pname, param in model.named_parameters():
            param.requires_grad_(pname in new)
    # Channels-last (NHWC) activations: PyTorch's CPU depthwise and pointwise convolutions run their
    # faster oneDNN kernels in that layout. Measured on this 2-core VM, batch 8 at 192x192: forward
    # 0.30 -> 0.16 s and backward 0.46 -> 0.33 s per step; a 55-minute run went from 3,142 to 5,037 steps.
    # Only float rounding differs; the trained model goes back to NCHW (contiguous) before export.
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (in place; stubs lack it)
    model.to(device)
    on_gpu = device.type == "cuda"
    stride = model.stride
    if cfg.crop % stride or cfg.image_size % stride:
        raise TrainingError(f"crop and image size must be multiples of {stride}")
    teacher = load_teacher(cfg, device)
    sampler = PhantomSampler(cfg, modalities, cfg.seed)
    val = validation_set(cfg, modalities) if cfg.val_every > 0 else []
    loss_fn = SegmentationLoss(cfg).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = _Ema(model, cfg.ema_decay)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    budget_s = cfg.minutes * 60.0
    history: list[dict[str, float]] = []
    best: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] | None = None
    bar = _progress_bar(cfg, progress)
    t0 = time.monotonic()
    step = 0
    running: dict[str, float] = {}
    logger.info(
        "Training on %s (%s): %s, %.3f GMAC/frame at %dx%d",
        ", ".join(modalities),
        hardware,
        f"{cfg.steps} steps" if cfg.steps is not None else f"{cfg.minutes:g} min",
        count_macs(model, (1, cfg.model.in_channels, cfg.image_size, cfg.image_size)) / 1e9,
        cfg.image_size,
        cfg.image_size,
    )
    try:
        while True:
            elapsed = time.monotonic() - t0
            frac = step / cfg.steps if cfg.steps is not None else elapsed / budget_s
            if frac >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(frac, cfg.warmup_frac)
            # A frozen body stays in eval mode: its BatchNorm statistics must not drift either.
            model.train(not cfg.freeze_body)
            x, y, tip = sampler.batch()
            if on_gpu:  # the sampler's tensors are fresh: pinning lets the copies overlap the GPU's work
                x, y, tip = (t.pin_memory().to(device, non_blocking=True) for t in (x, y, tip))
            x = x.contiguous(memory_format=torch.channels_last)
            parts = training_step(model, loss_fn, opt, (x, y, tip), cfg.precision, teacher=teacher)
            ema.update(model)
            step += 1
            for k, v in parts.items():
                running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
            if bar is not None:
                bar.set_postfix(loss=f"{running['loss']:.3f}", dice=f"{running['dice']:.3f}", refresh=False)
                done = step if cfg.steps is not None else min(int(time.monotonic() - t0), bar.total)
                if done > bar.n:
                    bar.update(done - bar.n)
            last = cfg.steps is not None and step >= cfg.steps
            if cfg.val_every > 0 and (step % cfg.val_every == 0 or last):
                rec = {
                    "step": float(step),
                    "seconds": time.monotonic() - t0,
                    **running,
                    **validate(ema.model, val, presence_min_px=cfg.presence_min_px),
                }
                history.append(rec)
                score = rec["val_instrument_dice"] + rec["val_target_dice"]
                # With a frozen body the Dice cannot choose (it does not move): the final head is kept.
                if not cfg.freeze_body and (
                    not best or score > best["val_instrument_dice"] + best["val_target_dice"]
                ):
                    best = rec
                    best_state = {k: v.detach().clone() for k, v in ema.model.state_dict().items()}
                logger.info(
                    "step %d: loss %.3f val instrument Dice %.3f target Dice %.3f",
                    step,
                    running["loss"],
                    rec["val_instrument_dice"],
                    rec["val_target_dice"],
                )
                if out_dir is not None:
                    torch.save(ema.model.state_dict(), out_dir / "last.pt")
                    (out_dir / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.monotonic() - t0
    final = ema.model
    if cfg.val_every > 0 and val:
        rec = {
            "step": float(step),
            "seconds": seconds,
            **running,
            **validate(final, val, presence_min_px=cfg.presence_min_px),
        }
        if not history or history[-1]["step"] != step:
            history.append(rec)
        score = rec["val_instrument_dice"] + rec["val_target_dice"]
        if best and best_state is not None and score < best["val_instrument_dice"] + best["val_target_dice"]:
            final.load_state_dict(best_state)
        else:
            best = rec
    final.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    final.to("cpu")  # exported, saved and calibrated on the CPU
    final.eval()
    result = TrainResult(
        model=final,  # type: ignore[arg-type]
        steps=step,
        seconds=seconds,
        history=tuple(history),
        best_metrics=best,
        modalities=modalities,
        out_dir=out_dir,
        hardware=hardware,
    )
    if out_dir is not None:
        save_run(result, cfg, out_dir, name=name, sequences_used=sampler.sequences_used)
    return result


def _progress_bar(cfg: TrainConfig, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    if cfg.steps is not None:
        return tqdm(total=cfg.steps, unit="step", file=sys.stderr, desc="train", dynamic_ncols=True)
    # A wall-clock budget: whole seconds (a float total printed "54.99999999999996/3300.0").
    return tqdm(
        total=math.ceil(cfg.minutes * 60.0),
        unit="s",
        file=sys.stderr,
        desc="train",
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]",
    )


def training_card(cfg: TrainConfig, result: TrainResult, sequences_used: int) -> dict[str, Any]:
    """The ``training`` block of the model card."""
    return {
        "data": (
            "procedurally simulated phantom sequences (guidance.phantoms: "
            + ", ".join(result.modalities)
            + "), each with its own configuration drawn from its seed; no patient data"
        ),
        "modalities": list(result.modalities),
        "train_seed_range": list(TRAIN_SEED_RANGE),
        "validation_seed_base": VALIDATION_SEED_BASE,
        "sequences_used": sequences_used,
        "frames_seen": result.steps * cfg.batch_size,
        "steps": result.steps,
        "wall_seconds": round(result.seconds, 1),
        "hardware": result.hardware,
        "seed": cfg.seed,
        "recipe": {
            "optimizer": f"AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, "
            f"warm-up {cfg.warmup_frac:g} then cosine",
            "batch": cfg.batch_size,
            "crop": cfg.crop,
            "image_size": cfg.image_size,
            "ema_decay": cfg.ema_decay,
            "loss": (
                f"{cfg.w_ce:g}*CE(instrument weight {cfg.instrument_ce_weight:g}, "
                f"target weight {cfg.target_ce_weight:g}) "
                f"+ {cfg.w_dice:g}*Dice(instrument, {cfg.target_dice_weight:g}*target) "
                f"+ {cfg.w_tversky:g}*Tversky(instrument, a={cfg.tversky_alpha:g}, b={cfg.tversky_beta:g}) "
                f"+ {cfg.w_cldice:g}*clDice(instrument) + {cfg.w_tip:g}*tip-heatmap BCE (training-only head)"
                + (
                    f" + {cfg.w_distill:g}*KL(teacher || student) per pixel, the teacher "
                    f"{Path(cfg.teacher_weights).name} (sha256 {sha256_file(cfg.teacher_weights)}) frozen and "
                    "averaged with its left-right mirror"
                    if cfg.teacher_weights
                    else ""
                )
            ),
            "sampling": (
                f"instrument frames p={cfg.needle_fraction:g}; crops centred on instrument "
                f"p={cfg.crop_on_instrument:g}, on target p={cfg.crop_on_target:g}, anywhere otherwise; "
                f"ultrasound sequences forced to carry bone or distractor lines "
                f"p={cfg.hard_negative_fraction:g}, and a hyper- or iso-echoic lesion "
                f"p={cfg.rare_target_fraction:g}, point reflectors (wires, calcifications; half of them in a "
                f"water bath{', half of those with floating line reflectors' if cfg.bath_lines else ''}) "
                f"p={cfg.point_reflector_fraction:g}, curved specular walls without a shadow "
                f"(cavities, bowls) p={cfg.curved_wall_fraction:g}; fluoroscopy sequences forced to low dose with "
                f"opaque vessels p={cfg.fluoro_hard_negative_fraction:g}"
            ),
            "augmentation": "affine (rotation +-12 deg US / +-25 deg fluoro, zoom 0.8-1.3, shift 8%), "
            "h-flip (+ v-flip fluoro), gamma 0.7-1.5, gain 0.7-1.3, offset +-0.06, blur p=0.3, "
            "multiplicative and additive noise p=0.5, crops",
            "config": cfg.to_dict(),
        },
        "validation": result.best_metrics,
    }


def save_run(
    result: TrainResult,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    name: str = DEFAULT_MODEL_NAME,
    sequences_used: int = 0,
    evaluation: dict[str, Any] | None = None,
    limits: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``<name>.pt`` (state_dict), ``<name>.onnx`` and ``<name>.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), out_dir / f"{name}.pt")
    (out_dir / "history.json").write_text(json.dumps(list(result.history), indent=1), encoding="utf-8")
    info = CardInfo(
        name=name,
        # Date and UTC time of the run's end, then the seed: two runs of one seed on one day (s12 and s19
        # both were "2026.11.24-s12") must not share a version, which DICOM SEG writes as AlgorithmVersion.
        version=time.strftime("%Y.%m.%d-%H%M", time.gmtime()) + f"-s{cfg.seed}",
        training=training_card(cfg, result, sequences_used),
        evaluation=evaluation or {},
        limits=tuple(limits) or DEFAULT_LIMITS,
    )
    return export_model_asset(result.model, out_dir, info, height=cfg.image_size, width=cfg.image_size)


DEFAULT_LIMITS: tuple[str, ...] = (
    "Trained only on simulated phantoms; never validated on patient images.",
    "One instrument per frame (a straight needle in ultrasound; a needle, curved catheter or guidewire in "
    "fluoroscopy); several instruments at once are out of distribution.",
    "Single-frame input: no temporal context; flicker is left to the interpretation's tip filter.",
    "Fixed 256x256 input: frames are stretched to it, so very non-square frames lose thin-structure detail.",
)


def load_trained(path: Path, config: UNetConfig | None = None) -> UNet:
    """Load a ``.pt`` state_dict (written by :func:`save_run`) into a fresh model in eval mode."""
    model = build_model(config or UNetConfig())
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
