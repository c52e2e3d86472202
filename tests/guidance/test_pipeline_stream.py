"""Stream boundaries in the live pipeline: the engine (and the interpreter) start over where a new stream
starts (a reconnect, another device, a gap), and nowhere else."""

from __future__ import annotations

import socket
import time

import numpy as np
import numpy.typing as npt

from engines import registry
from engines.base import EngineInfo, SegmentationOutput
from guidance.config import EngineSettings, Settings, StreamSettings
from guidance.latency import LatencyMonitor
from guidance.pipeline import LATENCY_NAMES, InferenceWorker
from guidance.results import GuidanceResult
from guidance.session import LiveSession
from guidance.slots import LatestSlot
from streaming.frame import Frame
from streaming.igtl import IGTLServer, encode_image

TIMEOUT = 5.0


class _Logged:
    """The classical engine, logging ``reset`` and the frame each ``infer`` gets (pixel value = seq)."""

    name = "logged"

    def __init__(self) -> None:
        self.inner = registry.create("classical")
        self.log: list[str | int] = []

    def load(self) -> None:
        self.inner.load()

    def warm_up(self) -> None:
        self.inner.warm_up()

    def reset(self) -> None:
        self.log.append("reset")
        self.inner.reset()

    def infer(self, image: npt.NDArray[np.generic]) -> SegmentationOutput:
        self.log.append(int(np.asarray(image).reshape(-1)[0]))
        return self.inner.infer(image)

    def describe(self) -> EngineInfo:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()

    def stream_starts(self) -> list[int]:
        """The frames segmented right after a reset: the first frame of each stream."""
        starts: list[int] = []
        after_reset = False
        for entry in self.log:
            if entry == "reset":
                after_reset = True
            elif after_reset:
                starts.append(int(entry))
                after_reset = False
        return starts


def _wait_result(results: LatestSlot[GuidanceResult], seq: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        r = results.peek()
        if r is not None and r.seq == seq:
            return
        time.sleep(0.002)
    raise AssertionError(f"no result for frame {seq}")


def test_worker_resets_on_request_device_change_and_gap() -> None:
    engine = _Logged()
    engine.load()
    frames: LatestSlot[Frame] = LatestSlot()
    results: LatestSlot[GuidanceResult] = LatestSlot()
    worker = InferenceWorker(
        engine,
        frames,
        results,
        LatencyMonitor(LATENCY_NAMES),
        budget_ms=1e3,
        step_down=None,
        stream_gap_s=0.2,
    )
    worker.start()

    def send(seq: int, device: str = "US") -> None:
        wall, mono = Frame.now()
        frames.put(
            Frame(seq, device, np.full((32, 32), seq, np.uint8), receive_wall_ns=wall, receive_ns=mono)
        )
        _wait_result(results, seq)

    try:
        for seq in range(3):
            send(seq)
        worker.start_stream(4)  # a reconnect: frames from 4 on are a new stream
        send(3)  # a frame of the old connection still waiting in the slot: the end of the old stream
        send(4)
        send(5)
        send(6, device="US2")  # another stream on the same connection
        send(7, device="US2")
        time.sleep(0.3)  # longer than the gap: the previous frame is no longer "the previous frame"
        send(8, device="US2")
        send(9, device="US2")
    finally:
        worker.stop()
    assert [f for f in engine.log if f != "reset"] == list(range(10))
    assert engine.stream_starts() == [0, 4, 6, 8]
    assert engine.log.count("reset") == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_session_starts_a_new_stream_when_the_source_reconnects() -> None:
    """A peer that goes away and comes back (a scanner restarted, a replay started again): the first frame
    after the reconnect is a stream's first frame for the engine; frames of one connection are one stream."""
    port = _free_port()
    settings = Settings(
        stream=StreamSettings(port=port, reconnect_initial_s=0.01, reconnect_max_s=0.05),
        engine=EngineSettings(backend="classical", step_down=""),
    )
    engine = _Logged()
    seq = 0
    with LiveSession(settings, simulate=False, engine=engine) as session:
        for _ in range(2):  # two connections
            server = IGTLServer(port=port)
            server.start()
            try:
                assert server.wait_for_clients(1, TIMEOUT)
                for _ in range(3):
                    server.send(bytes(encode_image(np.full((32, 32), seq, np.uint8), "US")))
                    _wait_result(session.results, seq)
                    seq += 1
            finally:
                assert server.stop()
    assert [f for f in engine.log if f != "reset"] == list(range(6))
    assert engine.stream_starts() == [0, 3]
