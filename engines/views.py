"""State of a model that fuses each frame's log-odds with the previous frame's.

Two kinds of graph keep such state:

* **Alternating views** (card ``test_time.mirror`` = ``"alternate"``,
  :class:`engines.models.unet.AlternatingMirror`): one network pass per frame, on the frame as it is or
  on its left-right mirror image, the view flipping from frame to frame; the target log-odds are the mean
  of this frame's and the previous frame's, which came from the other view.
* **A running target** (card ``test_time.fusion`` = ``"running"``,
  :class:`engines.models.unet.RunningTarget`): one pass per frame, always the plain view; the target
  log-odds are a running (exponential) average over the frames, the previous average weighted by the
  card's ``test_time.fuse_weights.target``. The instrument is this frame's only.

Everything that changes from frame to frame lives outside the graph, in the tensors named here;
:class:`FusionState` keeps them, backend-agnostic, in preallocated buffers:

* ``view_mirrored`` (1,) float32, alternating views only: 1 when this frame runs mirrored, else 0;
* ``previous_weight`` (1,) float32: the previous frame's share (0.5 for alternating views, the card's
  weight for a running target), or 0 on a stream's first frame (nothing to fuse with);
* ``previous_target`` (1, H, W) float32: the previous frame's ``target_log_odds`` output (its own
  log-odds for alternating views, the running average for a running target);
* ``previous_instrument`` (1, H, W) float32, only where the card fuses the instrument too (alternating
  views whose card ``test_time.fused_classes`` holds ``"instrument"``): the previous frame's
  ``instrument_log_odds``, which the graph weighs less than the target's (card
  ``test_time.fuse_weights``), since the needle moves on every frame.

The backends feed each state output buffer of one frame as the matching input of the next
(:func:`state_pairs`; ONNX Runtime swaps two bound buffers, TensorRT copies on the device, torch
overwrites a device tensor in place), so this module never touches those.

A new stream (``reset()``), or a frame of another geometry, starts again with the plain view and weight 0:
the previous log-odds belong to another picture.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import numpy.typing as npt

VIEW_MIRRORED = "view_mirrored"
PREVIOUS_TARGET = "previous_target"
PREVIOUS_WEIGHT = "previous_weight"
TARGET_LOG_ODDS = "target_log_odds"
PREVIOUS_INSTRUMENT = "previous_instrument"
INSTRUMENT_LOG_ODDS = "instrument_log_odds"
#: The graph's inputs besides the image, in the order the export declares them (a graph that fuses the
#: instrument too has ``previous_instrument`` after these: :func:`state_inputs`).
STATE_INPUTS = (VIEW_MIRRORED, PREVIOUS_TARGET, PREVIOUS_WEIGHT)
#: Card ``test_time.mirror`` value of an alternating-view model.
ALTERNATE = "alternate"
#: Card ``test_time.fusion`` value of a running-target model.
RUNNING = "running"
#: Weight of the previous frame's target log-odds when there is one (a plain mean of the two views).
FUSE_WEIGHT = 0.5


def state_inputs(fuse_instrument: bool, alternate: bool = True) -> tuple[str, ...]:
    """The graph's inputs besides the image, in declaration order (``alternate`` False: a running
    target, which has no view flag and never fuses the instrument)."""
    if not alternate:
        if fuse_instrument:
            raise ValueError("a running target fuses the target only")
        return STATE_INPUTS[1:]
    return (*STATE_INPUTS, PREVIOUS_INSTRUMENT) if fuse_instrument else STATE_INPUTS


def state_pairs(fuse_instrument: bool) -> tuple[tuple[str, str], ...]:
    """``(state input, the output that feeds it on the next frame)`` pairs, in declaration order."""
    pairs = ((PREVIOUS_TARGET, TARGET_LOG_ODDS),)
    return (*pairs, (PREVIOUS_INSTRUMENT, INSTRUMENT_LOG_ODDS)) if fuse_instrument else pairs


class FusionState:
    """Which view the next frame gets, and whether it has a previous frame to fuse with.

    ``alternate`` False (a running target): the view stays plain, and ``previous_share`` is the weight
    written on every frame after the first.

    Use: :meth:`begin` before each run (writes ``mirror`` and ``weight``, which the backend has bound as
    inputs), :meth:`end` after it succeeded. ``mirror`` and ``weight`` may be caller-owned ``(1,)``
    float32 buffers (e.g. pinned host memory); they are written in place, never reallocated.
    """

    def __init__(
        self,
        mirror: npt.NDArray[np.float32] | None = None,
        weight: npt.NDArray[np.float32] | None = None,
        *,
        alternate: bool = True,
        previous_share: float = FUSE_WEIGHT,
    ) -> None:
        if not 0.0 < previous_share < 1.0:
            raise ValueError(f"previous_share must be in (0, 1), got {previous_share}")
        self.alternate = alternate
        self.previous_share = float(previous_share)
        self.mirror = np.zeros(1, dtype=np.float32) if mirror is None else mirror
        self.weight = np.zeros(1, dtype=np.float32) if weight is None else weight
        for name, buf in ((VIEW_MIRRORED, self.mirror), (PREVIOUS_WEIGHT, self.weight)):
            if buf.size != 1 or buf.dtype != np.float32:
                raise ValueError(f"{name} buffer must be float32 (1,), got {buf.dtype} {buf.shape}")
        self._view = 0  # 0: the frame as it is, 1: mirrored
        self._has_previous = False
        self._key: Hashable = None
        self.mirror.fill(0.0)
        self.weight.fill(0.0)

    @property
    def mirrored(self) -> bool:
        """Whether the frame of the next :meth:`begin` (or the current one, between begin and end) is
        mirrored."""
        return self._view == 1

    def reset(self) -> None:
        """A new stream: the next frame is plain and has nothing to fuse with."""
        self._view = 0
        self._has_previous = False

    def begin(self, key: Hashable = None) -> None:
        """Set the state inputs for the next frame. ``key`` identifies the frame geometry: when it differs
        from the previous frame's, the stream starts again (the previous log-odds are another picture's)."""
        if key != self._key:
            self.reset()
            self._key = key
        self.mirror.fill(float(self._view))
        self.weight.fill(self.previous_share if self._has_previous else 0.0)

    def end(self) -> None:
        """The frame ran: its log-odds are the next frame's previous ones, and the view flips (alternating
        views)."""
        self._has_previous = True
        if self.alternate:
            self._view ^= 1
