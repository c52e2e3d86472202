"""Native recordings: round trip, truncated files, write errors, the Recorder service, the record CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from guidance.recorder import POLICY, Recorder
from streaming.igtl import IGTLServer, encode_image, encode_transform
from streaming.igtl.wire import RawMessage
from streaming.recording import (
    RecordingError,
    RecordingReader,
    RecordingWriter,
    recording_to_sequence,
    sequence_to_recording,
)
from streaming.sequence import SequenceFile, read_sequence, write_sequence

REPO = Path(__file__).resolve().parents[2]


def _raw(i: int, shape: tuple[int, int] = (48, 64), device: str = "Image") -> RawMessage:
    msg = encode_image(
        np.full(shape, i % 256, np.uint8), device, spacing_mm=(0.5, 0.25), timestamp_ns=time.time_ns()
    )
    return RawMessage(
        bytes(msg[:58]), bytes(msg[58:]), 1_700_000_000_000_000_000 + i * 33_000_000, i * 33_000_000
    )


def test_rec_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.mcap"
    sent = [_raw(i) for i in range(40)]
    meta = {"app_version": "0.1.0", "session_id": "abc", "study": {"operator": "x"}}
    with RecordingWriter(path, meta, chunk_size=64 * 1024) as w:
        for i, r in enumerate(sent):
            w.write_message(r)
            if i == 10:
                w.add_marker("needle in", wall_ns=123)
        w.write_result(7, 999, b"\x01\x02", "tip-json")
    r = RecordingReader(path)
    assert r.complete
    assert r.metadata == meta
    assert r.message_count == 40
    assert r.duration_s == pytest.approx(39 * 0.033)
    assert [(m.wall_ns, m.label) for m in r.markers] == [(123, "needle in")]
    msgs = list(r)
    assert [(m.header, m.body) for m in msgs] == [(s.header, s.body) for s in sent]  # original bytes
    assert msgs[3].receive_ns == sent[3].receive_ns
    assert msgs[3].receive_wall_ns == sent[3].receive_wall_ns
    assert (msgs[0].type, msgs[0].device) == ("IMAGE", "Image")
    frames = list(r.frames())
    assert len(frames) == 40
    assert frames[17].pixels[0, 0] == 17
    assert frames[17].pixels.shape == (48, 64)
    assert frames[17].spacing_mm == (0.5, 0.25)
    (res,) = list(r.results())
    assert (res.seq, res.receive_ns, res.payload, res.encoding) == (7, 999, b"\x01\x02", "tip-json")


def test_rec_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "a.mcap"
    path.write_bytes(b"x")
    with pytest.raises(RecordingError, match="already exists"):
        RecordingWriter(path).open()


def test_rec_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "junk.mcap"
    path.write_bytes(b"not an mcap file at all")
    with pytest.raises(RecordingError):
        RecordingReader(path).open()


def test_rec_truncated_file_reads_up_to_last_chunk(tmp_path: Path) -> None:
    path = tmp_path / "a.mcap"
    with RecordingWriter(path, {}, chunk_size=32 * 1024) as w:
        for i in range(60):
            w.write_message(_raw(i))
    data = path.read_bytes()
    counts = []
    for cut in (len(data) - 1, len(data) * 2 // 3, len(data) // 3):
        p = tmp_path / f"cut{cut}.mcap"
        p.write_bytes(data[:cut])
        r = RecordingReader(p)
        assert not r.complete
        frames = list(r.frames())
        assert len(frames) == r.message_count
        assert [int(f.pixels[0, 0]) for f in frames] == list(range(len(frames)))  # a clean prefix
        counts.append(len(frames))
    assert counts[0] == 60  # only the footer was lost
    assert counts[0] > counts[1] > counts[2] > 0


_FSIZE_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, time
    import numpy as np
    from streaming.igtl import encode_image
    from streaming.igtl.wire import RawMessage
    from streaming.recording import RecordingWriter, RecordingWriteError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
    w = RecordingWriter(sys.argv[1], {"k": "v"}, chunk_size=20_000)
    w.open()
    ok = 0
    try:
        for i in range(1000):
            m = encode_image(np.full((100, 100), i % 256, np.uint8), "Image")
            w.write_message(RawMessage(bytes(m[:58]), bytes(m[58:]), i, i))
            ok += 1
    except RecordingWriteError as exc:
        try:
            w.write_message(RawMessage(bytes(m[:58]), bytes(m[58:]), i, i))
        except RecordingWriteError:
            print("again")
        w.close()
        print("error", ok, exc)
    """
)


def test_rec_write_error_is_clear_and_prefix_stays_readable(tmp_path: Path) -> None:
    """A real EFBIG (file size limit) in a child process: RecordingWriteError, earlier data readable."""
    path = tmp_path / "full.mcap"
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    ).stdout.split()
    assert out[:2] == ["again", "error"]
    written_ok = int(out[2])
    assert written_ok > 10
    r = RecordingReader(path)
    assert not r.complete
    frames = list(r.frames())
    assert 0 < len(frames) <= written_ok
    assert [int(f.pixels[0, 0]) for f in frames] == list(range(len(frames)))


def test_rec_recorder_service_writes_everything(tmp_path: Path) -> None:
    path = tmp_path / "r.mcap"
    rec = Recorder(path, {"session_id": "s"})
    rec.start()
    producer = threading.Thread(
        target=lambda: [rec.submit(_raw(i)) for i in range(100)], name="guidance-test-rx"
    )
    producer.start()
    rec.add_marker("start")
    rec.submit_result(3, 42, b"x", "label-map")
    producer.join()
    st = rec.stop()
    assert st.written == 100
    assert st.dropped == 0
    assert st.errors == 0
    assert st.policy == POLICY
    assert st.bytes == sum(len(_raw(i).header) + len(_raw(i).body) for i in range(1)) * 100
    r = RecordingReader(path)
    assert r.message_count == 100
    assert r.complete
    assert [m.label for m in r.markers] == ["start"]
    assert r.result_count == 1
    assert not rec.submit(_raw(0))  # after stop: refused and counted
    assert rec.stats().dropped == 1


def test_rec_recorder_drop_newest_when_backlog_full(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "d.mcap", {}, max_backlog_mb=0.01)  # 10 KiB: one big message never fits
    rec.start()
    try:
        assert rec.submit(_raw(0, shape=(8, 8)))
        assert not rec.submit(_raw(1, shape=(200, 200)))
    finally:
        st = rec.stop()
    assert st.written == 1
    assert st.dropped == 1


def test_rec_export_import_round_trip(tmp_path: Path) -> None:
    rec = tmp_path / "a.mcap"
    with RecordingWriter(rec, {}) as w:
        for i in range(6):
            w.write_message(_raw(i))
            m = np.eye(4)
            m[0, 3] = float(i)
            t = encode_transform(m, "ProbeToTracker")
            w.write_message(RawMessage(bytes(t[:58]), bytes(t[58:]), 0, 0))
    out = tmp_path / "a.igs.mha"
    assert recording_to_sequence(rec, out) == 6
    seq = read_sequence(out)
    assert seq.frames.shape == (6, 48, 64)
    assert [int(v) for v in seq.frames[:, 0, 0]] == list(range(6))
    assert seq.spacing == (0.5, 0.25)
    assert seq.transform_status["ProbeToTracker"] == ("INVALID",) + ("OK",) * 5
    assert seq.transforms["ProbeToTracker"][3][0, 3] == 2.0  # latest transform before frame 3
    np.testing.assert_allclose(np.diff(seq.timestamps), 0.033, atol=1e-6)
    back = tmp_path / "b.mcap"
    assert sequence_to_recording(out, back) == 6
    frames = list(RecordingReader(back).frames())
    np.testing.assert_array_equal(np.stack([f.pixels for f in frames]), seq.frames)


def test_rec_import_plus_sample_keeps_timing(tmp_path: Path) -> None:
    from tests.conftest import PLUS_DATA

    src = PLUS_DATA / "NwirePhantomFreehand.igs.mha"
    out = tmp_path / "n.mcap"
    assert sequence_to_recording(src, out) == 97
    r = RecordingReader(out)
    seq = read_sequence(src)
    assert r.duration_s == pytest.approx(seq.duration_s, abs=1e-6)
    assert len(list(r.frames())) == 97


# ---------------------------------------------------------------------------------------------- CLI


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guidance", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_rec_export_cli(tmp_path: Path) -> None:
    src = tmp_path / "s.igs.nrrd"
    write_sequence(SequenceFile.from_frames(np.zeros((3, 8, 8), np.uint8)), src)
    rec = tmp_path / "s.mcap"
    res = _run_cli("export", str(src), "--recording", str(rec))
    assert res.returncode == 0, res.stderr
    res = _run_cli("export", str(rec), "--mha", str(tmp_path / "s.igs.mha"))
    assert res.returncode == 0, res.stderr
    assert len(read_sequence(tmp_path / "s.igs.mha")) == 3
    res = _run_cli("export", str(rec), "--mha", str(tmp_path / "s.igs.mha"))
    assert res.returncode == 1
    assert "already exists" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_rec_record_cli_survives_sigkill(tmp_path: Path) -> None:
    """Stream frames, SIGKILL `guidance record` mid-stream; everything up to ~1 s before the kill is there."""
    out = tmp_path / "killed.mcap"
    fps = 40
    with IGTLServer(name="guidance-test-server", send_queue=256) as server:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guidance",
                "record",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "--out",
                str(out),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.wait_for_clients(1, timeout=30), "recorder never connected"
            sent_at: list[float] = []
            pace = threading.Event()
            t0 = time.monotonic()
            for i in range(int(fps * 2.5)):
                pace.wait(max(0.0, t0 + i / fps - time.monotonic()))
                server.send(encode_image(np.full((96, 128), i % 256, np.uint8), "Image"))
                sent_at.append(time.monotonic())
            t_kill = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()
    must_have = sum(1 for t in sent_at if t < t_kill - 1.0)
    r = RecordingReader(out)
    assert not r.complete
    assert r.metadata["source"]["port"] == server.port
    frames = list(r.frames())
    assert len(frames) >= must_have > 0
    assert [int(f.pixels[0, 0]) for f in frames] == [i % 256 for i in range(len(frames))]


def test_rec_record_cli_reports_connection_failure(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _run_cli(
        "record", "--port", str(port), "--out", str(tmp_path / "x.mcap"), "--connect-timeout", "0.5"
    )
    assert res.returncode == 1
    assert "cannot connect" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("guidance record: cannot connect")
    res = _run_cli("record", "--port", str(port), "--out", str(tmp_path / "x.igs.nrrd"))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "guidance record: x.igs.nrrd: recordings are MCAP files; name the file *.mcap"
    )
    assert not (tmp_path / "x.igs.nrrd").exists()


def test_rec_record_cli_duration_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "d.mcap"
    with IGTLServer(name="guidance-test-server", send_queue=64) as server:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guidance",
                "record",
                "--port",
                str(server.port),
                "--out",
                str(out),
                "--duration",
                "1",
                "--meta",
                "operator=tech1",
                "--device",
                "Image",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.wait_for_clients(1, timeout=30)
            for i in range(5):
                server.send(encode_image(np.full((8, 8), i, np.uint8), "Image"))
                server.send(encode_image(np.full((8, 8), 99, np.uint8), "Other"))
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, err
    r = RecordingReader(out)
    assert r.complete
    assert r.metadata["study"] == {"operator": "tech1"}
    assert [int(f.pixels[0, 0]) for f in r.frames()] == [0, 1, 2, 3, 4]
    assert "tech1" not in err  # study fields are stored, never printed


_RECORDER_FSIZE_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    from guidance.recorder import Recorder
    from streaming.igtl import encode_image
    from streaming.igtl.wire import RawMessage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    errors = []
    rec = Recorder(sys.argv[1], {"k": "v"}, chunk_size=30_000, on_error=errors.append)
    rec.start()
    m = encode_image(np.zeros((100, 100), np.uint8), "Image")
    raw = RawMessage(bytes(m[:58]), bytes(m[58:]), 0, 0)
    for i in range(100):
        rec.submit(raw)
    st = rec.stop()
    print(st.errors, len(errors), st.written + st.dropped, int(rec.submit(raw)), st.error is not None)
    """
)


def test_rec_recorder_surfaces_write_errors(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RECORDER_FSIZE_CHILD, str(tmp_path / "f.mcap")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    ).stdout.split()
    errors, callbacks, accounted, accepted_after, has_reason = out
    assert (errors, callbacks, accepted_after, has_reason) == ("1", "1", "0", "True")
    assert accounted == "100"  # every submitted message is either written or counted as dropped
    assert RecordingReader(tmp_path / "f.mcap").message_count > 0
