"""Replay server: sequence files and recordings over real loopback OpenIGTLink, re-stamped headers."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streaming.frame import Frame
from streaming.igtl import IGTLClient, encode_image, igtl_timestamp_to_ns, unpack_header
from streaming.igtl.wire import RawMessage
from streaming.recording import RecordingWriter
from streaming.replay import ReplayError, ReplayServer, restamp_header
from streaming.sequence import SequenceFile, write_sequence

REPO = Path(__file__).resolve().parents[2]


class _Sink:
    """Collects what an IGTLClient receives; ``wait(n)`` blocks until n frames arrived."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.raws: list[RawMessage] = []
        self._cond = threading.Condition()

    def on_frame(self, f: Frame) -> None:
        with self._cond:
            self.frames.append(f)
            self._cond.notify_all()

    def on_raw(self, r: RawMessage) -> None:
        self.raws.append(r)

    def wait(self, n: int, timeout: float = 20.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.frames) >= n, timeout)


def _client(port: int, sink: _Sink) -> IGTLClient:
    return IGTLClient(
        "127.0.0.1",
        port,
        on_frame=sink.on_frame,
        on_raw=sink.on_raw,
        reconnect=False,
        name="guidance-test-client",
    )


def _seq(n: int = 8, dt: float = 0.01) -> SequenceFile:
    frames = np.stack([np.full((30, 40), i, np.uint8) for i in range(n)])
    return SequenceFile.from_frames(frames, 100.0 + np.arange(n) * dt, spacing=(0.2, 0.3))


def test_replay_restamp_header_keeps_everything_else() -> None:
    msg = encode_image(np.zeros((4, 4), np.uint8), "Image", timestamp_ns=1)
    wall = 1_700_000_000_123_456_789
    h = restamp_header(bytes(msg[:58]), wall)
    assert h[:34] == msg[:34]
    assert h[42:] == msg[42:58]  # body size and CRC untouched
    assert abs(igtl_timestamp_to_ns(unpack_header(h).timestamp) - wall) <= 1  # type: ignore[operator]


@pytest.mark.parametrize("suffix", [".igs.mha", ".seq.nrrd"])
def test_replay_sequence_file_at_original_timing(tmp_path: Path, suffix: str) -> None:
    src = _seq()
    path = write_sequence(src, tmp_path / f"s{suffix}")
    sink = _Sink()
    t_start = time.time_ns()
    with ReplayServer(path) as server:
        client = _client(server.port, sink)
        client.start()
        try:
            assert server.wait(20.0)
            assert sink.wait(len(src))
        finally:
            client.stop()
        st = server.stats()
    assert st.sent == len(src)
    assert st.error is None
    assert math.isfinite(st.timing_error_p99_ms)
    assert [int(f.pixels[0, 0]) for f in sink.frames] == list(range(len(src)))
    np.testing.assert_array_equal(sink.frames[3].pixels, src.frames[3])
    assert sink.frames[0].spacing_mm == pytest.approx((0.2, 0.3))
    # Re-stamped at the actual send time on our clock (not the file's 100 s epoch).
    assert all(f.sender_time_ns is not None and f.sender_time_ns >= t_start for f in sink.frames)
    assert all(f.sender_time_ns <= f.receive_wall_ns + 1000 for f in sink.frames if f.sender_time_ns)


def test_replay_recording_sends_original_bytes(tmp_path: Path) -> None:
    rec = tmp_path / "r.mcap"
    originals = []
    with RecordingWriter(rec, {}) as w:
        for i in range(5):
            m = encode_image(np.full((16, 16), i, np.uint8), "Probe", timestamp_ns=1_000_000_000 + i)
            raw = RawMessage(bytes(m[:58]), bytes(m[58:]), 0, i * 5_000_000)
            originals.append(raw)
            w.write_message(raw)
    sink = _Sink()
    with ReplayServer(rec, rate=2.0) as server:
        client = _client(server.port, sink)
        client.start()
        try:
            assert server.wait(20.0)
            assert sink.wait(5)
        finally:
            client.stop()
    assert [r.body for r in sink.raws] == [o.body for o in originals]  # bodies byte-identical, CRC valid
    for got, orig in zip(sink.raws, originals, strict=True):
        assert got.header[:34] == orig.header[:34]
        assert got.header[42:] == orig.header[42:]
        assert got.header[34:42] != orig.header[34:42]  # timestamp re-stamped
    assert [f.device for f in sink.frames] == ["Probe"] * 5


def test_replay_loop_at_max_speed_and_stop(tmp_path: Path) -> None:
    sink = _Sink()
    server = ReplayServer(_seq(4), max_speed=True, loop=True)
    server.start()
    client = _client(server.port, sink)
    client.start()
    try:
        assert sink.wait(12)
    finally:
        server.stop()
        client.stop()
    st = server.stats()
    assert st.loops >= 2
    assert st.finished
    assert math.isnan(st.timing_error_p50_ms)  # not measured at max speed
    assert [int(f.pixels[0, 0]) for f in sink.frames[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_replay_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such file"):
        ReplayServer(tmp_path / "missing.mcap").start()
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"garbage")
    with pytest.raises(ReplayError, match="not a recording"):
        ReplayServer(junk).start()
    with pytest.raises(ValueError, match="rate"):
        ReplayServer(junk, rate=0)


def test_replay_cli_serves_a_file(tmp_path: Path) -> None:
    path = write_sequence(_seq(3), tmp_path / "c.igs.mha")
    import socket

    with socket.socket() as s:  # pick a free port for the CLI
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "guidance", "replay", str(path), "--port", str(port), "--max-speed"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sink = _Sink()
    client = IGTLClient(
        "127.0.0.1",
        port,
        on_frame=sink.on_frame,
        backoff_initial_s=0.1,
        backoff_max_s=0.2,
        name="guidance-test-cli",
    )
    client.start()
    try:
        assert sink.wait(3, timeout=30.0)
        _, err = proc.communicate(timeout=30)
    finally:
        client.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "sent 3 messages" in err


def test_replay_plus_sample_sends_images_and_transforms() -> None:
    from streaming.igtl import TransformMessage
    from streaming.sequence import read_sequence
    from tests.conftest import PLUS_DATA

    seq = read_sequence(PLUS_DATA / "NwirePhantomFreehand.igs.mha")
    seq = SequenceFile(  # the first 5 frames, so the test stays short
        frames=seq.frames[:5],
        timestamps=seq.timestamps[:5],
        image_status=seq.image_status[:5],
        transforms={k: v[:5] for k, v in seq.transforms.items()},
        transform_status={k: v[:5] for k, v in seq.transform_status.items()},
    )
    sink = _Sink()
    transforms: list[TransformMessage] = []
    with ReplayServer(seq, max_speed=True, device="Image_Reference") as server:
        client = IGTLClient(
            "127.0.0.1",
            server.port,
            on_frame=sink.on_frame,
            on_message=lambda m: transforms.append(m) if isinstance(m, TransformMessage) else None,
            reconnect=False,
            name="guidance-test-client",
        )
        client.start()
        try:
            assert server.wait(20.0)
            assert sink.wait(5)
        finally:
            client.stop()
    assert [f.device for f in sink.frames] == ["Image_Reference"] * 5
    np.testing.assert_array_equal(sink.frames[4].pixels, seq.frames[4])
    # StylusToTracker is INVALID in every frame of this file: only the two OK transforms are sent.
    assert sorted({t.device for t in transforms}) == ["ProbeToTracker", "ReferenceToTracker"]
    probe = [t for t in transforms if t.device == "ProbeToTracker"]
    assert len(probe) == 5
    np.testing.assert_allclose(probe[2].matrix, seq.transforms["ProbeToTracker"][2], rtol=1e-6, atol=1e-3)
