"""The built-in simulated scanner: a phantom served over real OpenIGTLink on loopback.

The demo and the tests use exactly the path a real scanner would: frames are encoded, sent through a TCP
socket by our own server and decoded by our own client. Nothing is short-circuited in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from guidance.phantoms import make_phantom
from streaming.igtl import IGTLServer

logger = logging.getLogger(__name__)

DEVICE_NAME = "Image_Reference"  # PLUS's conventional name for the B-mode image in the reference frame

#: Phantom overrides of the "demo" scene, per modality: the seed still draws tissue, speckle and motion,
#: but the instrument is clearly in plane and aimed at the target, with no distractors.
DEMO_SCENES: dict[str, dict[str, Any]] = {
    "us": {
        "geometry": "linear",
        "needle": True,
        "needle_side": "left",
        "needle_angle_deg": 35.0,
        "aim_offset_px": 0.0,
        "overshoot_frac": 0.0,
        "out_of_plane_frac": 0.0,
        "target_kind": "hypo",
        "bone": False,
        "n_distractors": 0,
    },
    "fluoro": {
        "instrument": True,
        "instrument_kind": "catheter",
        "curvature": 0.12,
        "entry_side": "left",
        "target_kind": "lesion",
        "aim_offset_px": 0.0,
    },
}


def phantom_overrides(modality: str, scene: str) -> dict[str, Any]:
    if scene == "random":
        return {}
    if scene != "demo":
        raise ValueError(f"unknown simulator scene {scene!r}; use 'demo' or 'random'")
    return dict(DEMO_SCENES.get(modality, {}))


@dataclass(frozen=True, slots=True)
class SimulatorStats:
    frames_sent: int
    clients: int
    late_ticks: int  # frames produced after their deadline (the generator or the machine was too slow)


class SimulatedScanner:
    """Generates phantom frames at a fixed rate and broadcasts them with an :class:`IGTLServer`.

    Each IMAGE carries its phantom frame index in the ``FrameIndex`` metadata; phantoms are deterministic
    with random access, so a receiver can regenerate the ground truth of any frame it got.

    Lifecycle: ``start()`` binds the server (``port`` is then known) and starts the pacing thread;
    ``stop()`` stops both within a bounded time. ``max_frames`` stops producing after that many frames.
    """

    def __init__(
        self,
        *,
        modality: str = "us",
        fps: float = 30.0,
        width: int = 256,
        height: int = 256,
        seed: int = 0,
        scene: str = "demo",
        host: str = "127.0.0.1",
        port: int = 0,
        max_frames: int | None = None,
        wait_for_client: bool = True,
    ) -> None:
        self.modality = modality
        self.fps = fps
        self._size = (width, height)
        self._seed = seed
        self._overrides = phantom_overrides(modality, scene)
        self._server = IGTLServer(host=host, port=port, name="guidance-sim-server")
        self._max_frames = max_frames
        self._wait_for_client = wait_for_client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = 0
        self._late = 0
        self._done = threading.Event()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def done(self) -> threading.Event:
        """Set once ``max_frames`` frames have been sent."""
        return self._done

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._phantom = make_phantom(
            self.modality,
            seed=self._seed,
            width=self._size[0],
            height=self._size[1],
            fps=self.fps,
            **self._overrides,
        )
        self._server.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="guidance-simulator", daemon=True)
        self._thread.start()
        logger.info("Simulated %s scanner on port %d at %.1f fps", self.modality, self.port, self.fps)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("simulator thread did not stop within %.1f s", timeout)
            self._thread = None
        self._server.stop()

    def stats(self) -> SimulatorStats:
        return SimulatorStats(self._sent, self._server.client_count, self._late)

    def _run(self) -> None:
        period = 1.0 / self.fps
        # Do not burn phantom frames before anyone listens: the first frame goes to the first client.
        # (Bounded waits so stop() is honoured promptly; this is start-up, not the frame path.)
        while self._wait_for_client and not self._server.wait_for_clients(1, timeout=0.1):
            if self._stop.is_set():
                return
        next_t = time.perf_counter()
        i = 0
        while not self._stop.is_set():
            if self._max_frames is not None and i >= self._max_frames:
                self._done.set()
                return
            pf = self._phantom.frame(i)
            meta = {"FrameIndex": str(i), "Modality": pf.modality.upper()}
            self._server.send_image(pf.image, DEVICE_NAME, spacing_mm=pf.spacing_mm, metadata=meta)
            self._sent += 1
            i += 1
            next_t += period
            delay = next_t - time.perf_counter()
            if delay < 0:
                self._late += 1
                if delay < -period:  # far behind (debugger, suspended VM): resynchronise, don't burst
                    next_t = time.perf_counter()
                continue
            if self._stop.wait(delay):
                return
