"""Client and server over real loopback sockets: delivery, seq/stamps, filters, raw messages, results sent
back, several clients with a slow one, prompt stop, hostile peers, reconnect cycles and idle CPU."""

from __future__ import annotations

import queue
import socket
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest

from streaming.frame import Frame
from streaming.igtl import (
    HEADER_SIZE,
    AnyMessage,
    ConnectionEvent,
    IGTLClient,
    IGTLServer,
    RawMessage,
    StringMessage,
    TransformMessage,
    encode_image,
    encode_status,
    encode_string,
    encode_transform,
    pack_header,
)

TIMEOUT = 5.0


def _client(port: int, **kw: object) -> tuple[IGTLClient, queue.Queue[Frame], queue.Queue[ConnectionEvent]]:
    frames: queue.Queue[Frame] = queue.Queue()
    events: queue.Queue[ConnectionEvent] = queue.Queue()
    opts: dict[str, object] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "on_state": events.put}
    opts.update(kw)
    c = IGTLClient("127.0.0.1", port, on_frame=frames.put, **opts)  # type: ignore[arg-type]
    return c, frames, events


@pytest.fixture
def server() -> Iterator[IGTLServer]:
    s = IGTLServer()
    s.start()
    yield s
    assert s.stop()


def _wait_event(events: queue.Queue[ConnectionEvent], state: str) -> ConnectionEvent:
    deadline = time.monotonic() + TIMEOUT
    while True:
        ev = events.get(timeout=max(0.01, deadline - time.monotonic()))
        if ev.state == state:
            return ev


def test_igtl_client_receives_frames_with_seq_stamps_and_metadata(server: IGTLServer) -> None:
    client, frames, _ = _client(server.port)
    client.start()
    try:
        assert server.wait_for_clients(1, TIMEOUT)
        img = np.arange(480 * 640, dtype=np.uint16).reshape(480, 640)
        got = []
        for i in range(3):
            before = time.time_ns()
            server.send_image(img, "Probe", spacing_mm=(0.2, 0.3), metadata={"i": str(i)}, message_id=i)
            f = frames.get(timeout=TIMEOUT)
            got.append(f)
            assert f.sender_time_ns is not None
            assert before <= f.sender_time_ns <= f.receive_wall_ns
            assert f.receive_ns > 0
        assert [f.seq for f in got] == [0, 1, 2]
        assert [f.message_id for f in got] == [0, 1, 2]
        assert [f.metadata["i"] for f in got] == ["0", "1", "2"]
        np.testing.assert_array_equal(got[0].pixels, img)
        assert got[0].pixels is not got[1].pixels
        np.testing.assert_array_equal(got[0].pixels, img)  # still valid after later messages
        assert got[0].spacing_mm == pytest.approx((0.2, 0.3))
        st = client.stats
        assert (st.frames, st.connected, st.crc_errors, st.protocol_errors) == (3, True, 0, 0)
    finally:
        assert client.stop()


def test_igtl_client_device_filter_messages_and_raw(server: IGTLServer) -> None:
    msgs: queue.Queue[AnyMessage] = queue.Queue()
    raws: list[RawMessage] = []
    client, frames, _ = _client(server.port, device_filter="Wanted", on_message=msgs.put, on_raw=raws.append)
    client.start()
    try:
        assert server.wait_for_clients(1, TIMEOUT)
        server.send_image(np.zeros((4, 4), np.uint8), "Other")
        server.send_image(np.ones((4, 4), np.uint8), "Wanted")
        f = frames.get(timeout=TIMEOUT)
        assert f.device == "Wanted"
        server.send(encode_transform(np.eye(4), "Needle"))
        server.send(
            pack_header(version=1, message_type="POLYDATA", device="x", timestamp=0, body_size=3, crc=0)
            + b"abc"
        )
        m = msgs.get(timeout=TIMEOUT)
        assert isinstance(m, TransformMessage)
        deadline = time.monotonic() + TIMEOUT
        while len(raws) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.header[2:14].rstrip(b"\0") for r in raws] == [b"IMAGE", b"IMAGE", b"TRANSFORM", b"POLYDATA"]
        assert raws[-1].body == b"abc"
        assert all(r.receive_ns > 0 for r in raws)
        st = client.stats
        assert st.filtered == 1
        assert st.frames == 1
        assert st.unknown_skipped == 1
    finally:
        assert client.stop()


def test_igtl_server_receives_results_and_hello(server: IGTLServer) -> None:
    got: queue.Queue[AnyMessage] = queue.Queue()
    srv = IGTLServer(on_message=got.put)
    srv.start()
    client, _, _ = _client(srv.port)
    client.start()
    try:
        hello = got.get(timeout=TIMEOUT)
        assert (hello.message_type, hello.version) == ("STATUS", 2)  # the v2 hello PlusServer upgrades on
        assert client.send(encode_string("label ready", "Result"))
        m = got.get(timeout=TIMEOUT)
        assert isinstance(m, StringMessage)
        assert m.text == "label ready"
    finally:
        assert client.stop()
        assert srv.stop()


def test_igtl_server_slow_client_never_blocks_others() -> None:
    srv = IGTLServer(send_queue=2)
    srv.start()
    slow = socket.create_connection(("127.0.0.1", srv.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    client, frames, _ = _client(srv.port)
    client.start()
    try:
        assert srv.wait_for_clients(2, TIMEOUT)
        img = np.zeros((1024, 1024), np.uint8)
        for i in range(40):
            assert srv.send(encode_image(img, "US", message_id=i)) == 2
            # pace the producer a little so the fast client keeps up; the slow one cannot
            f = frames.get(timeout=TIMEOUT)
            while f.message_id < i:
                f = frames.get(timeout=TIMEOUT)
        st = srv.stats
        slow_stats = [c for c in st.per_client if c.sent < 40]
        assert slow_stats
        assert slow_stats[0].dropped > 0
        assert st.dropped >= slow_stats[0].dropped
    finally:
        assert client.stop()
        slow.close()
        assert srv.stop()


def test_igtl_stop_interrupts_blocking_recv_and_backoff() -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    client, _, events = _client(silent.getsockname()[1])
    client.start()
    conn, _ = silent.accept()
    try:
        _wait_event(events, "connected")
        assert client.stop(timeout=2.0)  # blocked in recv on a silent peer
        assert _wait_event(events, "stopped").reason == "stop requested"
    finally:
        conn.close()
        silent.close()
    port = _free_port()
    waiting, _, events2 = _client(port, backoff_initial_s=30.0, backoff_max_s=30.0)
    waiting.start()
    _wait_event(events2, "disconnected")  # refused, now in a 15-30 s backoff wait
    assert waiting.stop(timeout=2.0)


def test_igtl_max_clients_rejects_extra() -> None:
    srv = IGTLServer(max_clients=1)
    srv.start()
    a = socket.create_connection(("127.0.0.1", srv.port))
    b = socket.create_connection(("127.0.0.1", srv.port))
    try:
        b.settimeout(TIMEOUT)
        assert b.recv(1) == b""  # closed by the server
        assert srv.client_count == 1
        assert srv.stats.rejected == 1
    finally:
        a.close()
        b.close()
        assert srv.stop()


# ------------------------------------------------------------------------------------------ hostile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HELLO_SIZE = len(encode_status("", 1))


def _accept(evil: socket.socket) -> socket.socket:
    """Accept the client and read its hello (so closing later is a clean FIN, not a RST)."""
    conn, _ = evil.accept()
    conn.settimeout(TIMEOUT)
    got = 0
    while got < HELLO_SIZE:
        chunk = conn.recv(HELLO_SIZE - got)
        assert chunk
        got += len(chunk)
    return conn


def _good_image(i: int = 0) -> bytes:
    return bytes(encode_image(np.full((8, 8), i, np.uint8), "US", message_id=i))


def _bad_crc() -> bytes:
    msg = bytearray(_good_image())
    msg[HEADER_SIZE + 12 + 72] ^= 0xFF
    return bytes(msg)


HOSTILE = {
    "truncated_header": (_good_image()[:30], "mid-header"),
    "truncated_body": (_good_image()[:100], "mid-body"),
    "absurd_body_size": (
        pack_header(version=1, message_type="IMAGE", device="x", timestamp=0, body_size=1 << 40, crc=0),
        "exceeds the limit",
    ),
    "wrong_crc": (_bad_crc(), "CRC mismatch"),
    "garbage": (bytes(range(256)) * 4, "invalid message type"),
    "stall_mid_message": (_good_image()[:100], "stalled"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_igtl_client_survives_hostile_server(case: str, caplog: pytest.LogCaptureFixture) -> None:
    payload, reason = HOSTILE[case]
    evil = socket.create_server(("127.0.0.1", 0))
    evil.settimeout(TIMEOUT)
    client, frames, events = _client(evil.getsockname()[1], stall_timeout_s=0.3, max_body_bytes=1 << 20)
    client.start()
    conns = []
    try:
        c1 = _accept(evil)
        conns.append(c1)
        c1.sendall(payload)
        if case != "stall_mid_message":
            c1.close()
        ev = _wait_event(events, "disconnected")
        assert reason in ev.reason
        assert reason in caplog.text  # the reason is logged
        c2 = _accept(evil)  # it reconnected ...
        conns.append(c2)
        c2.sendall(_good_image(7))
        f = frames.get(timeout=TIMEOUT)  # ... and keeps working
        assert f.message_id == 7
        st = client.stats
        assert st.reconnects >= 1
        if case == "wrong_crc":
            assert st.crc_errors == 1
    finally:
        assert client.stop()
        for c in conns:
            c.close()
        evil.close()


def test_igtl_client_survives_vanishing_server() -> None:
    evil = socket.create_server(("127.0.0.1", 0))
    evil.settimeout(TIMEOUT)
    client, frames, events = _client(evil.getsockname()[1])
    client.start()
    try:
        c1 = _accept(evil)
        c1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c1.sendall(_good_image(1)[:200])
        c1.close()  # RST: the peer vanished mid-message
        _wait_event(events, "disconnected")
        c2 = _accept(evil)
        c2.sendall(_good_image(2))
        assert frames.get(timeout=TIMEOUT).message_id == 2
        c2.close()
    finally:
        assert client.stop()
        evil.close()


def test_igtl_client_keeps_connection_on_malformed_but_well_framed_content(server: IGTLServer) -> None:
    client, frames, _ = _client(server.port)
    client.start()
    try:
        assert server.wait_for_clients(1, TIMEOUT)
        body = b"\x00" * 10  # a 10-byte TRANSFORM (needs 48): framed correctly, content malformed
        server.send(
            pack_header(version=1, message_type="TRANSFORM", device="T", timestamp=0, body_size=10, crc=0)
            + body
        )
        server.send(_good_image(5))
        assert frames.get(timeout=TIMEOUT).message_id == 5
        st = client.stats
        assert st.protocol_errors == 1
        assert st.reconnects == 0
    finally:
        assert client.stop()


@pytest.mark.parametrize("payload", [b"\xff" * 200, HOSTILE["absurd_body_size"][0], HOSTILE["wrong_crc"][0]])
def test_igtl_server_survives_hostile_client_and_serves_others(payload: bytes) -> None:
    srv = IGTLServer(max_body_bytes=1 << 20)
    srv.start()
    good, frames, _ = _client(srv.port)
    good.start()
    evil = socket.create_connection(("127.0.0.1", srv.port))
    evil.settimeout(TIMEOUT)
    try:
        assert srv.wait_for_clients(2, TIMEOUT)
        evil.sendall(payload)
        assert evil.recv(65536) == b""  # the server closed the hostile client
        srv.send(_good_image(3))
        assert frames.get(timeout=TIMEOUT).message_id == 3
        st = srv.stats
        assert st.protocol_errors + st.crc_errors == 1
    finally:
        evil.close()
        assert good.stop()
        assert srv.stop()


# ------------------------------------------------------------------------------- reconnect, idle CPU


def _thread_cpu_s(client: IGTLClient) -> float:
    thread = client._thread
    assert thread is not None
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _reconnect_cycles(cycles: int) -> None:
    port = _free_port()
    client, frames, _ = _client(port, backoff_initial_s=0.005, backoff_max_s=0.02)
    client.start()
    try:
        for i in range(cycles):
            srv = IGTLServer(port=port)
            srv.start()
            try:
                assert srv.wait_for_clients(1, TIMEOUT), f"cycle {i}: client did not reconnect"
                srv.send(_good_image(i % 256))
                assert frames.get(timeout=TIMEOUT).message_id == i % 256
            finally:
                assert srv.stop()
            if i % 10 == 9:  # between cycles too, not only at the end: disconnected means idle
                cpu0 = _thread_cpu_s(client)
                time.sleep(0.3)
                between = _thread_cpu_s(client) - cpu0
                assert between < 0.06, f"cycle {i}: {between:.3f} s CPU in 0.3 s while disconnected"
        assert client.stats.frames == cycles
        assert client.stats.reconnects >= cycles - 1
        # Disconnected now: the thread must be idle (backoff waits), not spinning.
        cpu0 = _thread_cpu_s(client)
        time.sleep(1.0)
        idle_cpu = _thread_cpu_s(client) - cpu0
        assert idle_cpu < 0.2, f"client thread used {idle_cpu:.3f} s CPU in 1 s while disconnected"
    finally:
        assert client.stop()


def test_igtl_reconnect_100_cycles_idle_cpu() -> None:
    """The issue's disconnect/reconnect test: 100 server up/down cycles, idle CPU checked in between."""
    _reconnect_cycles(100)


def test_igtl_connected_idle_does_not_spin(server: IGTLServer) -> None:
    client, _, _ = _client(server.port)
    client.start()
    try:
        assert server.wait_for_clients(1, TIMEOUT)
        cpu0 = _thread_cpu_s(client)
        time.sleep(0.5)
        assert _thread_cpu_s(client) - cpu0 < 0.1
    finally:
        assert client.stop()
