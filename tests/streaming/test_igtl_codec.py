"""Codec: header, CRC-64, every message type round trip, byte order, metadata, and a hypothesis fuzz of the
decoder (only ProtocolError may escape, and no input allocates more than the input itself)."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.igtl import codec
from streaming.igtl.codec import (
    HEADER_SIZE,
    ImageMessage,
    PointItem,
    PointMessage,
    PositionMessage,
    QueryMessage,
    StatusMessage,
    StringMessage,
    TransformMessage,
    decode_image,
    decode_message,
    decode_stream,
    encode_image,
    encode_message,
    encode_point,
    encode_position,
    encode_status,
    encode_string,
    encode_transform,
    igtl_timestamp_to_ns,
    ns_to_igtl_timestamp,
    pack_header,
    unpack_header,
)
from streaming.igtl.crc64 import CRC64_CHECK, crc64
from streaming.igtl.errors import (
    CrcError,
    FramingError,
    MessageTooLargeError,
    ProtocolError,
    UnsupportedContentError,
)

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64]


def _split(msg: bytes | bytearray) -> tuple[codec.Header, memoryview]:
    mv = memoryview(msg)
    return unpack_header(mv[:HEADER_SIZE]), mv[HEADER_SIZE:]


def test_igtl_crc64_check_value_and_incremental() -> None:
    assert crc64(b"123456789") == CRC64_CHECK == 0x6C40DF5F0B497347
    assert crc64(b"56789", crc64(b"1234")) == CRC64_CHECK
    assert crc64(b"") == 0


def test_igtl_timestamp_roundtrip_is_exact() -> None:
    for ns in (
        1,
        999_999_999,
        1_700_000_000_000_000_000,
        1_700_000_000_123_456_789,
        4_000_000_000_999_999_999,
    ):
        assert igtl_timestamp_to_ns(ns_to_igtl_timestamp(ns)) == ns
    assert igtl_timestamp_to_ns(0) is None
    ts = ns_to_igtl_timestamp(1_700_000_000_500_000_000)
    assert ts >> 32 == 1_700_000_000
    assert ts & 0xFFFFFFFF == 1 << 31


def test_igtl_header_pack_unpack() -> None:
    raw = pack_header(version=1, message_type="IMAGE", device="Probe", timestamp=5 << 32, body_size=10, crc=7)
    assert len(raw) == HEADER_SIZE
    h = unpack_header(raw)
    assert (h.version, h.message_type, h.device, h.body_size, h.crc) == (1, "IMAGE", "Probe", 10, 7)
    assert h.timestamp_ns == 5_000_000_000
    with pytest.raises(MessageTooLargeError):
        unpack_header(raw, max_body_bytes=9)
    with pytest.raises(FramingError):
        unpack_header(raw[:57])
    with pytest.raises(FramingError, match="version"):
        unpack_header(b"\x00\x07" + raw[2:])
    with pytest.raises(FramingError, match="type"):
        unpack_header(raw[:2] + b"\xff" * 12 + raw[14:])
    with pytest.raises(ValueError, match="longer than 20"):
        pack_header(version=1, message_type="IMAGE", device="x" * 21, timestamp=0, body_size=0, crc=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("comps", [1, 2, 3, 4])
def test_igtl_image_roundtrip_all_scalar_types(dtype: type[np.generic], comps: int) -> None:
    rng = np.random.default_rng(comps)
    shape = (5, 7) if comps == 1 else (5, 7, comps)
    px = (rng.random(shape) * 100).astype(dtype)
    msg = encode_image(px, "US", spacing_mm=(0.3, 0.4), timestamp_ns=1_700_000_000_000_000_001, message_id=9)
    h, body = _split(msg)
    frame = decode_image(h, body, seq=3, receive_wall_ns=11, receive_ns=12)
    assert frame.pixels.dtype == np.dtype(dtype)
    assert frame.pixels.dtype.isnative
    assert not frame.pixels.flags.writeable
    np.testing.assert_array_equal(frame.pixels, px)
    assert frame.spacing_mm == pytest.approx((0.3, 0.4))
    assert frame.sender_time_ns == 1_700_000_000_000_000_001
    assert (frame.seq, frame.receive_wall_ns, frame.receive_ns, frame.message_id) == (3, 11, 12, 9)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_igtl_image_big_endian_is_normalised_to_native(dtype: type[np.generic]) -> None:
    px = np.arange(12, dtype=dtype).reshape(3, 4)
    big = px.astype(np.dtype(dtype).newbyteorder(">"))
    h, body = _split(encode_image(big, "US"))
    assert body[12 + 4] == 1  # endian field: big
    frame = decode_image(h, body)
    assert frame.pixels.dtype.isnative
    np.testing.assert_array_equal(frame.pixels, px)


def test_igtl_image_pixels_are_a_view_of_the_body_no_copy() -> None:
    px = np.arange(64, dtype=np.uint8).reshape(8, 8)
    msg = bytearray(encode_image(px, "US", crc=False, version=1))  # v1: pixels are the last bytes
    h, body = _split(msg)
    frame = decode_image(h, body)
    msg[-1] = 0  # the receive buffer *is* the pixel storage
    assert frame.pixels[-1, -1] == 0


def test_igtl_image_matrix_and_metadata_v1_v2() -> None:
    m = np.array([[0, -0.5, 0, 10], [0.5, 0, 0, 20], [0, 0, 2, 30], [0, 0, 0, 1]], dtype=np.float64)
    meta = {"Hospital": "ACME", "Unicode": "µm ✓"}
    h, body = _split(encode_image(np.zeros((2, 3), np.uint8), "US", matrix=m, metadata=meta, message_id=77))
    msg = decode_message(h, body)
    assert isinstance(msg, ImageMessage)
    np.testing.assert_allclose(msg.frame.image_to_reference, m)
    assert msg.frame.spacing_mm == pytest.approx((0.5, 0.5))
    assert dict(msg.frame.metadata) == meta
    assert msg.message_id == msg.frame.message_id == 77
    h1, body1 = _split(encode_image(np.zeros((2, 3), np.uint8), "US", version=1))
    assert h1.version == 1
    assert decode_image(h1, body1).message_id == 0
    with pytest.raises(ValueError, match="version 2"):
        encode_image(np.zeros((2, 3), np.uint8), "US", version=1, metadata={"a": "b"})


def test_igtl_image_unsupported_and_malformed() -> None:
    h, body = _split(encode_image(np.zeros((2, 3), np.uint8), "US", version=1, crc=False))
    raw = bytearray(body)
    vol = raw.copy()
    struct.pack_into(">H", vol, 10, 2)  # size k = 2 slices
    with pytest.raises(UnsupportedContentError):
        decode_image(h, vol)
    bad = raw.copy()
    bad[3] = 99  # scalar type
    with pytest.raises(ProtocolError, match="scalar type"):
        decode_image(h, bad)
    short = encode_image(np.zeros((2, 3), np.uint8), "US", version=1, crc=False)
    hs = unpack_header(bytes(short[:HEADER_SIZE]))
    with pytest.raises(ProtocolError):
        decode_image(hs, memoryview(short)[HEADER_SIZE:-1])  # body shorter than the header says


def test_igtl_crc_mismatch_raises() -> None:
    msg = bytearray(encode_image(np.ones((4, 4), np.uint8), "US"))
    msg[HEADER_SIZE + 12 + 72] ^= 0xFF  # first pixel
    h, body = _split(msg)
    with pytest.raises(CrcError):
        decode_message(h, body)
    assert decode_message(h, body, verify_crc=False) is not None
    h0, body0 = _split(encode_image(np.ones((4, 4), np.uint8), "US", crc=False))
    assert h0.crc == 0
    assert decode_message(h0, body0) is not None  # CRC 0 = not computed, accepted


def test_igtl_transform_position_point_status_string_query() -> None:
    m = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [0, 0, 0, 1]], dtype=np.float64)
    t = decode_stream(encode_transform(m, "Needle", metadata={"k": "v"}))[0]
    assert isinstance(t, TransformMessage)
    np.testing.assert_allclose(t.matrix, m)
    assert t.metadata == {"k": "v"}

    p = decode_stream(encode_position([1.5, 2.5, 3.5], "Tip", quaternion=[0.0, 0.0, 0.6, 0.8]))[0]
    assert isinstance(p, PositionMessage)
    assert p.position == (1.5, 2.5, 3.5)
    assert p.quaternion == pytest.approx((0.0, 0.0, 0.6, 0.8))

    pts = [
        PointItem("tip", (1.0, 2.0, 3.0), "needle", (1, 2, 3, 4), 1.5, "US"),
        PointItem("target", (4.0, 5.0, 6.0)),
    ]
    pm = decode_stream(encode_point(pts, "Fids"))[0]
    assert isinstance(pm, PointMessage)
    assert pm.points == tuple(pts)

    s = decode_stream(encode_status("Dev", 13, subcode=42, error_name="NotReady", message="warming up"))[0]
    assert isinstance(s, StatusMessage)
    assert (s.code, s.subcode, s.error_name, s.status_message) == (13, 42, "NotReady", "warming up")

    for text, enc in (("hello", 3), ("héllo ✓", 106)):
        sm = decode_stream(encode_string(text, "Str"))[0]
        assert isinstance(sm, StringMessage)
        assert (sm.text, sm.encoding) == (text, enc)

    q = decode_stream(encode_message("GET_STATUS", "", version=1))[0]
    assert isinstance(q, QueryMessage)
    assert (q.message_type, q.content, q.version) == ("GET_STATUS", b"", 1)

    assert decode_stream(encode_message("POLYDATA", "x", b"\x00" * 40)) == [None]  # unknown: skipped


@pytest.mark.parametrize("nfloats", [3, 6, 7])
def test_igtl_position_spec_variants(nfloats: int) -> None:
    vals = [1.0, 2.0, 3.0, 0.0, 0.6, 0.0, 0.8][:nfloats]
    p = decode_stream(encode_message("POSITION", "P", struct.pack(f">{nfloats}f", *vals)))[0]
    assert isinstance(p, PositionMessage)
    assert p.position == (1.0, 2.0, 3.0)
    expected = {3: (0, 0, 0, 1), 6: (0, 0.6, 0, 0.8), 7: (0, 0.6, 0, 0.8)}[nfloats]
    assert p.quaternion == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ProtocolError):
        decode_stream(encode_message("POSITION", "P", b"\x00" * 20))


def test_igtl_metadata_sizes_are_validated() -> None:
    msg = bytearray(encode_string("x", "S", metadata={"key": "value"}, crc=False))
    struct.pack_into(">I", msg, HEADER_SIZE + 4, 10_000)  # metadata_size larger than the body
    with pytest.raises(ProtocolError):
        decode_stream(msg)


# -------------------------------------------------------------------------------------------- fuzzing

_VALID = [
    bytes(encode_image(np.arange(12, dtype=np.uint16).reshape(3, 4), "US", metadata={"a": "b"})),
    bytes(encode_transform(np.eye(4), "T")),
    bytes(encode_point([PointItem("p", (1.0, 2.0, 3.0))], "P")),
    bytes(encode_status("S", 1, message="ok")),
    bytes(encode_string("text", "S", version=1)),
    bytes(encode_position([1, 2, 3], "P")),
]
_TYPES = ["IMAGE", "TRANSFORM", "POSITION", "POINT", "STATUS", "STRING", "GET_STATUS", "OTHER"]


def _decode_any(data: bytes) -> None:
    try:
        h = unpack_header(data[:HEADER_SIZE], max_body_bytes=1 << 20)
        body = data[HEADER_SIZE : HEADER_SIZE + h.body_size]
        if len(body) == h.body_size:
            decode_message(h, body)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=400))
def test_igtl_fuzz_random_bytes(data: bytes) -> None:
    _decode_any(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 200),
)
def test_igtl_fuzz_mutated_valid_messages(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base)
    for pos, val in flips:
        data[pos % len(data)] = val
    _decode_any(bytes(data[: max(0, len(data) - cut)]))
    _decode_any(bytes(data))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_TYPES),
    st.integers(1, 2),
    st.binary(max_size=300),
)
def test_igtl_fuzz_well_framed_random_bodies(mtype: str, version: int, body: bytes) -> None:
    """Right header, random body: the body-level parsers (ext header, metadata, content) must hold up."""
    h = codec.Header(version, mtype, "d", 0, len(body), 0)
    with contextlib.suppress(ProtocolError):
        decode_message(h, body)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.sampled_from(sorted(codec.SCALAR_TYPES)),
)
def test_igtl_fuzz_absurd_image_sizes_allocate_nothing(cols: int, rows: int, comps: int, scalar: int) -> None:
    """An IMAGE header claiming a huge size with a tiny body is rejected without allocating it."""
    head = struct.pack(
        ">HBBBBHHH12fHHHHHH", 1, comps, scalar, 2, 2, cols, rows, 1, *([1.0] * 12), 0, 0, 0, cols, rows, 1
    )
    body = head + b"\x00" * 16
    h = codec.Header(1, "IMAGE", "d", 0, len(body), 0)
    try:
        msg = decode_message(h, body)
    except ProtocolError:
        return
    assert isinstance(msg, ImageMessage)
    assert msg.frame.pixels.nbytes <= 16
