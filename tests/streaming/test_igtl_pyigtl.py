"""Interop with pyigtl (the reference Python peer) over real loopback sockets, both directions.

pyigtl deviations found (we test against the spec, and document theirs):
* POSITION: pyigtl packs a POINT-like 152-byte element (name, group, rgba, xyz, quaternion, diameter,
  owner); the spec's POSITION is 12/24/28 bytes (xyz + quaternion). We reject theirs as malformed
  content (connection kept); pyigtl reads ours as zero positions.
* IMAGE axes: pyigtl takes arrays as (k, j, i[, c]); a 2-D (rows, cols) array is sent by pyigtl as a
  1 x cols x rows volume, so 2-D images must be given to pyigtl as (1, rows, cols).
* IMAGE matrix: pyigtl's ``ijk_to_world_matrix`` has the origin at the first voxel; on the wire (and in
  our Frame) the translation is the image centre.
* Text: pyigtl's ``encode_text`` catches ``UnicodeDecodeError`` instead of ``UnicodeEncodeError``, so a
  non-ASCII STRING or metadata value makes pyigtl's sender thread fail and drop the connection. We send
  non-ASCII as UTF-8 (MIBenum 106) per spec; pyigtl decodes that fine.
"""

from __future__ import annotations

import queue
import signal
import socket
from collections.abc import Iterator

import numpy as np
import pyigtl
import pytest

from streaming.frame import Frame
from streaming.igtl import (
    AnyMessage,
    IGTLClient,
    IGTLServer,
    PointItem,
    PointMessage,
    StringMessage,
    TransformMessage,
    encode_image,
    encode_point,
    encode_position,
    encode_string,
    encode_transform,
)

TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pyigtl_server() -> Iterator[pyigtl.OpenIGTLinkServer]:
    # pyigtl installs SIGINT/SIGTERM handlers; put ours back afterwards.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    srv = pyigtl.OpenIGTLinkServer(port=_free_port(), local_server=True)
    try:
        yield srv
    finally:
        srv.stop()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _origin_to_centre(m: np.ndarray, cols: int, rows: int) -> np.ndarray:
    out = np.array(m, dtype=np.float64)
    out[0:3, 3] = (m @ np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0]))[0:3]
    return out


@pytest.mark.parametrize(
    ("dtype", "comps"), [(np.uint8, 1), (np.int16, 1), (np.uint16, 1), (np.float32, 1), (np.uint8, 3)]
)
def test_igtl_pyigtl_server_to_our_client(
    pyigtl_server: pyigtl.OpenIGTLinkServer, dtype: type[np.generic], comps: int
) -> None:
    frames: queue.Queue[Frame] = queue.Queue()
    msgs: queue.Queue[AnyMessage] = queue.Queue()
    client = IGTLClient("127.0.0.1", pyigtl_server.port, on_frame=frames.put, on_message=msgs.put)
    client.start()
    try:
        assert client.wait_connected(TIMEOUT)
        rows, cols = 48, 64
        rng = np.random.default_rng(0)
        shape = (1, rows, cols) if comps == 1 else (1, rows, cols, comps)
        px = (rng.random(shape) * 120).astype(dtype)
        ijk = np.array([[0.3, 0, 0, 5.0], [0, 0.4, 0, -7.0], [0, 0, 1.0, 2.0], [0, 0, 0, 1]])
        ts = 1_700_000_123.25
        msg = pyigtl.ImageMessage(px, ijk_to_world_matrix=ijk, timestamp=ts, device_name="US")
        msg.header_version = 2
        msg.metadata = {"Modality": "US", "Depth": "60"}
        assert pyigtl_server.send_message(msg, wait=True)
        f = frames.get(timeout=TIMEOUT)
        np.testing.assert_array_equal(f.pixels, px[0])  # bit-exact
        assert f.pixels.dtype == np.dtype(dtype)
        assert f.spacing_mm == pytest.approx((0.3, 0.4))
        np.testing.assert_allclose(f.image_to_reference, _origin_to_centre(ijk, cols, rows), atol=1e-5)
        assert f.sender_time_ns is not None
        assert abs(f.sender_time_ns - int(ts * 1e9)) < 1_000
        assert dict(f.metadata) == {"Modality": "US", "Depth": "60"}
        assert f.device == "US"

        m = np.array([[0, -1, 0, 10], [1, 0, 0, 20], [0, 0, 1, 30], [0, 0, 0, 1]], dtype=np.float32)
        assert pyigtl_server.send_message(pyigtl.TransformMessage(m, device_name="Needle"), wait=True)
        assert pyigtl_server.send_message(pyigtl.StringMessage("hello", device_name="Text"), wait=True)
        assert pyigtl_server.send_message(
            pyigtl.PointMessage(
                positions=[[1, 2, 3], [4, 5, 6]], names=["tip", "target"], groups="g", device_name="Fids"
            ),
            wait=True,
        )
        t = msgs.get(timeout=TIMEOUT)
        assert isinstance(t, TransformMessage)
        np.testing.assert_allclose(t.matrix, m)
        s = msgs.get(timeout=TIMEOUT)
        assert isinstance(s, StringMessage)
        assert s.text == "hello"
        p = msgs.get(timeout=TIMEOUT)
        assert isinstance(p, PointMessage)
        assert [(q.name, q.group, q.position) for q in p.points] == [
            ("tip", "g", (1.0, 2.0, 3.0)),
            ("target", "g", (4.0, 5.0, 6.0)),
        ]
    finally:
        assert client.stop()


def test_igtl_pyigtl_position_deviation_is_rejected_not_fatal(
    pyigtl_server: pyigtl.OpenIGTLinkServer,
) -> None:
    frames: queue.Queue[Frame] = queue.Queue()
    client = IGTLClient("127.0.0.1", pyigtl_server.port, on_frame=frames.put)
    client.start()
    try:
        assert client.wait_connected(TIMEOUT)
        pos = pyigtl.PositionMessage([1, 2, 3], [0, 0, 0, 1], device_name="Tip")
        assert pyigtl_server.send_message(pos, wait=True)
        img = pyigtl.ImageMessage(np.zeros((1, 4, 4), np.uint8), device_name="US")
        assert pyigtl_server.send_message(img, wait=True)
        assert frames.get(timeout=TIMEOUT).device == "US"  # same connection still works
        st = client.stats
        assert st.protocol_errors == 1  # pyigtl's 152-byte POSITION is not a spec POSITION
        assert st.reconnects == 0
    finally:
        assert client.stop()


@pytest.fixture
def our_server() -> Iterator[IGTLServer]:
    srv = IGTLServer()
    srv.start()
    yield srv
    assert srv.stop()


@pytest.fixture
def pyigtl_client(our_server: IGTLServer) -> Iterator[pyigtl.OpenIGTLinkClient]:
    c = pyigtl.OpenIGTLinkClient("127.0.0.1", our_server.port)
    yield c
    c.stop()


@pytest.mark.parametrize(
    ("dtype", "comps"),
    [(np.uint8, 1), (np.int8, 1), (np.uint16, 1), (np.int32, 1), (np.float64, 1), (np.uint8, 4)],
)
def test_igtl_our_server_to_pyigtl_client(
    our_server: IGTLServer, pyigtl_client: pyigtl.OpenIGTLinkClient, dtype: type[np.generic], comps: int
) -> None:
    assert our_server.wait_for_clients(1, TIMEOUT)
    rows, cols = 30, 40
    shape = (rows, cols) if comps == 1 else (rows, cols, comps)
    px = (np.random.default_rng(1).random(shape) * 100).astype(dtype)
    centre = np.array([[0, -0.5, 0, 10.0], [0.25, 0, 0, 20.0], [0, 0, 1, 30.0], [0, 0, 0, 1]])
    ts_ns = 1_700_000_000_123_456_000
    our_server.send(
        encode_image(px, "US", matrix=centre, timestamp_ns=ts_ns, metadata={"k": "v"}, message_id=3)
    )
    msg = pyigtl_client.wait_for_message("US", timeout=TIMEOUT)
    assert msg is not None
    expected = px[np.newaxis]
    np.testing.assert_array_equal(msg.image, expected)
    assert msg.image.dtype == np.dtype(dtype)
    # pyigtl converts the centre back to the origin: undo that and compare with what we sent
    np.testing.assert_allclose(_origin_to_centre(msg.ijk_to_world_matrix, cols, rows), centre, atol=1e-5)
    assert msg.timestamp == pytest.approx(ts_ns / 1e9, abs=1e-6)
    assert msg.metadata == {"k": "v"}
    assert msg.message_id == 3


def test_igtl_our_server_to_pyigtl_client_other_types(
    our_server: IGTLServer, pyigtl_client: pyigtl.OpenIGTLinkClient
) -> None:
    assert our_server.wait_for_clients(1, TIMEOUT)
    m = np.array([[0, -1, 0, 10], [1, 0, 0, 20], [0, 0, 1, 30], [0, 0, 0, 1]], dtype=np.float64)
    our_server.send(encode_transform(m, "Needle"))
    t = pyigtl_client.wait_for_message("Needle", timeout=TIMEOUT)
    np.testing.assert_allclose(t.matrix, m)
    our_server.send(encode_string("label ready", "Text", version=1))
    assert pyigtl_client.wait_for_message("Text", timeout=TIMEOUT).string == "label ready"
    our_server.send(
        encode_point([PointItem("tip", (1.0, 2.0, 3.0), "needle", (1, 2, 3, 4), 2.0, "US")], "Fids")
    )
    p = pyigtl_client.wait_for_message("Fids", timeout=TIMEOUT)
    assert (p.names, p.groups, p.positions, p.rgba_colors, p.diameters, p.owners) == (
        ["tip"],
        ["needle"],
        [(1.0, 2.0, 3.0)],
        [(1, 2, 3, 4)],
        [2.0],
        ["US"],
    )
    # The spec's 28-byte POSITION: pyigtl expects its own 152-byte layout and finds no element in it.
    our_server.send(encode_position([1.0, 2.0, 3.0], "Tip"))
    pos = pyigtl_client.wait_for_message("Tip", timeout=TIMEOUT)
    assert pos.positions == []
