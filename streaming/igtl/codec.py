"""OpenIGTLink codec: header v1/v2, extended header + metadata, IMAGE, TRANSFORM, POSITION, POINT, STATUS,
STRING, and GET_/STT_/STP_/RTS_ queries.

Wire format (all numbers big-endian):

* header, 58 bytes: version u16, type char[12], device char[20], timestamp u64 (upper 32 bits: seconds
  since the Unix epoch, lower 32 bits: fraction of a second * 2**32), body_size u64, crc u64 (CRC-64
  ECMA-182 over the body; 0 = "not computed", accepted as such).
* v2 body: extended header (ext_header_size u16 = 12, metadata_header_size u16, metadata_size u32,
  message_id u32), content, metadata header (index_count u16, then per entry key_size u16,
  value_encoding u16 (MIBenum: 3 US-ASCII, 106 UTF-8), value_size u32), metadata (keys and values).

Encoding builds each message in one preallocated ``bytearray`` (pixels are copied once, into it) and
returns that bytearray (bytes-like; no extra copy to ``bytes``). Decoding uses ``np.frombuffer`` views of
the received body: an IMAGE's pixels *are* the receive buffer unless its byte order must be swapped.

Everything :func:`decode_message` raises on bad input is a :class:`~streaming.igtl.errors.ProtocolError`.
"""

from __future__ import annotations

import logging
import math
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from streaming.frame import Frame
from streaming.igtl.crc64 import BytesLike, crc64
from streaming.igtl.errors import (
    CrcError,
    FramingError,
    MessageTooLargeError,
    ProtocolError,
    UnsupportedContentError,
)

logger = logging.getLogger(__name__)

HEADER_SIZE: Final = 58
EXT_HEADER_SIZE: Final = 12
IMAGE_HEADER_SIZE: Final = 72
POINT_ELEMENT_SIZE: Final = 136
STATUS_HEADER_SIZE: Final = 30
TYPE_SIZE: Final = 12
DEVICE_SIZE: Final = 20

ENCODING_US_ASCII: Final = 3
ENCODING_UTF8: Final = 106

COORD_RAS: Final = 1
COORD_LPS: Final = 2

# STATUS codes (OpenIGTLink v2 spec).
STATUS_INVALID: Final = 0
STATUS_OK: Final = 1
STATUS_UNKNOWN_ERROR: Final = 2
STATUS_PANIC: Final = 3
STATUS_NOT_FOUND: Final = 4
STATUS_ACCESS_DENIED: Final = 5
STATUS_BUSY: Final = 6
STATUS_TIME_OUT: Final = 7
STATUS_OVERFLOW: Final = 8
STATUS_CHECKSUM_ERROR: Final = 9
STATUS_CONFIG_ERROR: Final = 10
STATUS_RESOURCE_ERROR: Final = 11
STATUS_UNKNOWN_INSTRUCTION: Final = 12
STATUS_NOT_READY: Final = 13
STATUS_MANUAL_MODE: Final = 14
STATUS_DISABLED: Final = 15
STATUS_NOT_PRESENT: Final = 16
STATUS_UNKNOWN_VERSION: Final = 17
STATUS_HARDWARE_FAILURE: Final = 18
STATUS_SHUTDOWN: Final = 19

_HEADER = struct.Struct(">H12s20sQQQ")
_EXT_HEADER = struct.Struct(">HHII")
_META_ENTRY = struct.Struct(">HHI")
_IMAGE_HEADER = struct.Struct(">HBBBBHHH12fHHHHHH")
_TRANSFORM = struct.Struct(">12f")
_POINT = struct.Struct(">64s32s4B4f20s")
_STATUS_HEAD = struct.Struct(">HQ20s")
_STRING_HEAD = struct.Struct(">HH")
_U16 = struct.Struct(">H")

assert _HEADER.size == HEADER_SIZE
assert _IMAGE_HEADER.size == IMAGE_HEADER_SIZE
assert _POINT.size == POINT_ELEMENT_SIZE
assert _STATUS_HEAD.size == STATUS_HEADER_SIZE

#: IGTL scalar type code -> numpy dtype (native byte order).
SCALAR_TYPES: Final[Mapping[int, np.dtype[np.generic]]] = MappingProxyType(
    {
        2: np.dtype(np.int8),
        3: np.dtype(np.uint8),
        4: np.dtype(np.int16),
        5: np.dtype(np.uint16),
        6: np.dtype(np.int32),
        7: np.dtype(np.uint32),
        10: np.dtype(np.float32),
        11: np.dtype(np.float64),
    }
)
_DTYPE_TO_SCALAR: Final[Mapping[np.dtype[np.generic], int]] = MappingProxyType(
    {dt: code for code, dt in SCALAR_TYPES.items()}
)
_NATIVE_ENDIAN: Final = 2 if sys.byteorder == "little" else 1
_QUERY_PREFIXES: Final = ("GET_", "STT_", "STP_", "RTS_")
_EMPTY_META: Final[Mapping[str, str]] = MappingProxyType({})


# ---------------------------------------------------------------------------------------------- header


def ns_to_igtl_timestamp(ns: int) -> int:
    """Wall-clock ns since the epoch -> OpenIGTLink 64-bit timestamp (seconds << 32 | fraction * 2**32)."""
    sec, rem = divmod(int(ns), 1_000_000_000)
    return ((sec & 0xFFFFFFFF) << 32) | ((rem << 32) // 1_000_000_000)


def igtl_timestamp_to_ns(ts: int) -> int | None:
    """OpenIGTLink 64-bit timestamp -> ns since the epoch, or None when the sender left it at 0.

    Exact inverse of :func:`ns_to_igtl_timestamp` (the fraction has 0.23 ns resolution).
    """
    if ts == 0:
        return None
    return (ts >> 32) * 1_000_000_000 + (((ts & 0xFFFFFFFF) * 1_000_000_000 + (1 << 31)) >> 32)


@dataclass(frozen=True, slots=True)
class Header:
    """The 58-byte OpenIGTLink message header, decoded.

    Attributes:
        version: header version (1: OpenIGTLink v1/v2 protocol; 2: v3 protocol with extended header).
        message_type: e.g. ``"IMAGE"``.
        device: device name (decoded as UTF-8, invalid bytes replaced).
        timestamp: the raw 64-bit timestamp field.
        body_size: bytes following the header.
        crc: CRC-64 of the body as sent (0: not computed by the sender).
    """

    version: int
    message_type: str
    device: str
    timestamp: int
    body_size: int
    crc: int

    @property
    def timestamp_ns(self) -> int | None:
        """Sender's wall-clock time in ns since the epoch (None when 0)."""
        return igtl_timestamp_to_ns(self.timestamp)


def _cstr(raw: bytes) -> str:
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", errors="replace")


def unpack_header(buf: BytesLike, max_body_bytes: int | None = None) -> Header:
    """Decode and validate a 58-byte header.

    Validation is strict enough to reject garbage quickly: version must be 1 or 2, the type must be
    1-12 printable ASCII characters (NUL padded), and ``body_size`` must not exceed ``max_body_bytes``.

    Raises:
        FramingError: the bytes are not a header we can trust (the connection must be closed).
        MessageTooLargeError: ``body_size > max_body_bytes``.
    """
    if len(buf) < HEADER_SIZE:
        raise FramingError(f"truncated header: {len(buf)} of {HEADER_SIZE} bytes")
    version, raw_type, raw_device, ts, body_size, crc = _HEADER.unpack_from(buf, 0)
    if version not in (1, 2):
        raise FramingError(f"unsupported header version {version}")
    type_bytes = raw_type.rstrip(b"\0")
    if not type_bytes or b"\0" in type_bytes or not all(0x20 < c < 0x7F for c in type_bytes):
        raise FramingError(f"invalid message type field {raw_type!r}")
    if max_body_bytes is not None and body_size > max_body_bytes:
        raise MessageTooLargeError(
            f"{type_bytes.decode('ascii')} body of {body_size} bytes exceeds the limit of {max_body_bytes}"
        )
    return Header(version, type_bytes.decode("ascii"), _cstr(raw_device), ts, body_size, crc)


def _encode_field(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size:
        raise ValueError(f"{what} {text!r} is longer than {size} bytes")
    return raw


def pack_header_into(
    buf: bytearray | memoryview,
    offset: int,
    *,
    version: int,
    message_type: str,
    device: str,
    timestamp: int,
    body_size: int,
    crc: int,
) -> None:
    """Write a header at ``buf[offset:offset+58]``. ``timestamp`` is the raw 64-bit field."""
    _HEADER.pack_into(
        buf,
        offset,
        version,
        _encode_field(message_type, TYPE_SIZE, "message type"),
        _encode_field(device, DEVICE_SIZE, "device name"),
        timestamp,
        body_size,
        crc,
    )


def pack_header(
    *, version: int, message_type: str, device: str, timestamp: int, body_size: int, crc: int
) -> bytes:
    """Return a 58-byte header (``timestamp`` is the raw 64-bit field)."""
    buf = bytearray(HEADER_SIZE)
    pack_header_into(
        buf,
        0,
        version=version,
        message_type=message_type,
        device=device,
        timestamp=timestamp,
        body_size=body_size,
        crc=crc,
    )
    return bytes(buf)


def check_crc(header: Header, body: BytesLike) -> None:
    """Raise :class:`CrcError` when the header carries a CRC (non-zero) that does not match ``body``."""
    if header.crc:
        actual = crc64(body)
        if actual != header.crc:
            raise CrcError(
                f"CRC mismatch on {header.message_type} from {header.device!r}: "
                f"header {header.crc:#018x}, body {actual:#018x}"
            )


# -------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Fields every decoded message has.

    Attributes:
        message_type: OpenIGTLink type name.
        device: device name.
        version: header version (1 or 2).
        timestamp_ns: sender wall clock (ns since epoch) or None when the sender sent 0.
        message_id: v2 message id (0 for v1).
        metadata: v2 metadata, read-only.
    """

    message_type: str
    device: str
    version: int = 2
    timestamp_ns: int | None = None
    message_id: int = 0
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY_META)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageMessage(Message):
    """IMAGE: the decoded :class:`Frame` plus the fields a Frame does not keep."""

    frame: Frame
    coordinate: int = COORD_LPS  # 1 RAS, 2 LPS


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TransformMessage(Message):
    """TRANSFORM: 4x4 homogeneous matrix (float64, read-only; last row 0 0 0 1)."""

    matrix: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionMessage(Message):
    """POSITION: position (mm) and orientation quaternion ``(qx, qy, qz, w)``.

    The spec allows 12 (position only; quaternion reported as identity), 24 (``w`` derived so the
    quaternion is unit) and 28 bytes.
    """

    position: tuple[float, float, float]
    quaternion: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class PointItem:
    """One element of a POINT message (136 bytes on the wire)."""

    name: str
    position: tuple[float, float, float]
    group: str = ""
    rgba: tuple[int, int, int, int] = (255, 255, 0, 255)
    diameter: float = 0.0
    owner: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PointMessage(Message):
    """POINT: a list of fiducials."""

    points: tuple[PointItem, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusMessage(Message):
    """STATUS: code (1 = OK), subcode, error name, free-text message."""

    code: int
    subcode: int = 0
    error_name: str = ""
    status_message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMessage(Message):
    """STRING: text with its MIBenum encoding (3 US-ASCII, 106 UTF-8)."""

    text: str
    encoding: int = ENCODING_US_ASCII


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryMessage(Message):
    """GET_*/STT_*/STP_*/RTS_* messages: requests and replies, content kept as raw bytes."""

    content: bytes = b""


AnyMessage = (
    ImageMessage
    | TransformMessage
    | PositionMessage
    | PointMessage
    | StatusMessage
    | StringMessage
    | QueryMessage
)


# ------------------------------------------------------------------------------------- body / metadata


def split_body(header: Header, body: BytesLike) -> tuple[int, int, int, Mapping[str, str]]:
    """Locate the content inside a body: ``(content_start, content_end, message_id, metadata)``.

    v1 bodies are all content. v2 bodies are validated (sizes must fit in the body).
    """
    size = len(body)
    if header.version < 2:
        return 0, size, 0, _EMPTY_META
    if size < EXT_HEADER_SIZE:
        raise ProtocolError(
            f"v2 body of {size} bytes is shorter than the {EXT_HEADER_SIZE}-byte extended header"
        )
    ext_size, meta_header_size, meta_size, message_id = _EXT_HEADER.unpack_from(body, 0)
    if ext_size < EXT_HEADER_SIZE:
        raise ProtocolError(f"extended header size {ext_size} < {EXT_HEADER_SIZE}")
    content_end = size - meta_header_size - meta_size
    if content_end < ext_size:
        raise ProtocolError(
            f"extended header ({ext_size}) + metadata ({meta_header_size}+{meta_size}) "
            f"exceed the body ({size})"
        )
    metadata = (
        _decode_metadata(body, content_end, meta_header_size, meta_size) if meta_header_size else _EMPTY_META
    )
    return ext_size, content_end, message_id, metadata


def _decode_text(raw: bytes, encoding: int) -> str:
    if encoding == ENCODING_US_ASCII:
        return raw.decode("ascii", errors="replace")
    # UTF-8 (106) and anything else we do not know: UTF-8 is the only sane guess; never fail on text.
    return raw.decode("utf-8", errors="replace")


def _decode_metadata(body: BytesLike, start: int, header_size: int, data_size: int) -> Mapping[str, str]:
    if header_size < 2:
        raise ProtocolError(f"metadata header size {header_size} < 2")
    (count,) = _U16.unpack_from(body, start)
    if 2 + count * _META_ENTRY.size > header_size:
        raise ProtocolError(f"metadata header of {header_size} bytes cannot hold {count} entries")
    pos = start + header_size
    end = pos + data_size
    out: dict[str, str] = {}
    mv = memoryview(body)
    for i in range(count):
        key_size, encoding, value_size = _META_ENTRY.unpack_from(body, start + 2 + i * _META_ENTRY.size)
        if pos + key_size + value_size > end:
            raise ProtocolError("metadata entries exceed the metadata size")
        key = bytes(mv[pos : pos + key_size]).decode("utf-8", errors="replace")
        pos += key_size
        out[key] = _decode_text(bytes(mv[pos : pos + value_size]), encoding)
        pos += value_size
    return MappingProxyType(out)


# ---------------------------------------------------------------------------------------------- decode


def decode_message(
    header: Header,
    body: BytesLike,
    *,
    verify_crc: bool = True,
    seq: int = 0,
    receive_wall_ns: int = 0,
    receive_ns: int = 0,
) -> AnyMessage | None:
    """Decode one message body; None for a type we do not handle (the caller counts it as skipped).

    IMAGE pixels are a view of ``body`` (no copy) when the byte order is native: keep ``body`` unchanged
    for as long as the frame lives (the client gives each image its own buffer).

    Raises:
        CrcError: the CRC does not match (only when ``verify_crc`` and the header carries a CRC).
        UnsupportedContentError: a valid message we do not handle (3-D volume, sub-volume, >4 components).
        ProtocolError: anything else malformed.
    """
    if len(body) != header.body_size:
        raise ProtocolError(f"body of {len(body)} bytes, header says {header.body_size}")
    if verify_crc:
        check_crc(header, body)
    mtype = header.message_type
    handler = _DECODERS.get(mtype)
    if handler is None and mtype != "IMAGE" and not mtype.startswith(_QUERY_PREFIXES):
        return None
    start, end, message_id, metadata = split_body(header, body)
    common: dict[str, Any] = {
        "message_type": mtype,
        "device": header.device,
        "version": header.version,
        "timestamp_ns": header.timestamp_ns,
        "message_id": message_id,
        "metadata": metadata,
    }
    if mtype == "IMAGE":
        frame, coordinate = _decode_image(
            header, body, start, end, message_id, metadata, seq, receive_wall_ns, receive_ns
        )
        return ImageMessage(frame=frame, coordinate=coordinate, **common)
    if handler is None:
        return QueryMessage(content=bytes(memoryview(body)[start:end]), **common)
    return handler(memoryview(body)[start:end], common)


def decode_image(
    header: Header,
    body: BytesLike,
    *,
    verify_crc: bool = True,
    seq: int = 0,
    receive_wall_ns: int = 0,
    receive_ns: int = 0,
) -> Frame:
    """Decode an IMAGE body straight to a :class:`Frame` (see :func:`decode_message`)."""
    if header.message_type != "IMAGE":
        raise ProtocolError(f"not an IMAGE message: {header.message_type}")
    if len(body) != header.body_size:
        raise ProtocolError(f"body of {len(body)} bytes, header says {header.body_size}")
    if verify_crc:
        check_crc(header, body)
    start, end, message_id, metadata = split_body(header, body)
    frame, _ = _decode_image(header, body, start, end, message_id, metadata, seq, receive_wall_ns, receive_ns)
    return frame


def _spacing(col: npt.NDArray[np.float64]) -> float:
    n = float(np.sqrt(np.dot(col, col)))
    return n if math.isfinite(n) and n > 0.0 else 1.0


def _decode_image(  # noqa: PLR0917 - private, called from two places with the split-body results
    header: Header,
    body: BytesLike,
    start: int,
    end: int,
    message_id: int,
    metadata: Mapping[str, str],
    seq: int,
    receive_wall_ns: int,
    receive_ns: int,
) -> tuple[Frame, int]:
    if end - start < IMAGE_HEADER_SIZE:
        raise ProtocolError(
            f"IMAGE content of {end - start} bytes is shorter than its {IMAGE_HEADER_SIZE}-byte header"
        )
    v = _IMAGE_HEADER.unpack_from(body, start)
    _version, comps, scalar, endian, coordinate = v[0:5]
    size = v[5:8]
    mat = v[8:20]
    sub_offset = v[20:23]
    sub_size = v[23:26]
    dtype = SCALAR_TYPES.get(scalar)
    if dtype is None:
        raise ProtocolError(f"IMAGE scalar type {scalar} is not defined")
    if endian not in (1, 2):
        raise ProtocolError(f"IMAGE endian field {endian} is neither 1 (big) nor 2 (little)")
    if comps < 1:
        raise ProtocolError("IMAGE with 0 components")
    if comps > 4:
        raise UnsupportedContentError(f"IMAGE with {comps} components (1-4 supported)")
    if size[2] != 1:
        raise UnsupportedContentError(f"IMAGE volume of {size[2]} slices (single-slice images only)")
    if tuple(sub_offset) != (0, 0, 0) or tuple(sub_size) != tuple(size):
        raise UnsupportedContentError(f"IMAGE sub-volume {sub_offset}+{sub_size} of {size}")
    count = size[0] * size[1] * comps
    pixel_start = start + IMAGE_HEADER_SIZE
    need = count * dtype.itemsize
    if end - pixel_start < need:
        raise ProtocolError(
            f"IMAGE {size[0]}x{size[1]}x{comps} needs {need} pixel bytes, got {end - pixel_start}"
        )
    wire = dtype.newbyteorder(">" if endian == 1 else "<")
    pixels: npt.NDArray[np.generic] = np.frombuffer(body, dtype=wire, count=count, offset=pixel_start)
    if endian != _NATIVE_ENDIAN and dtype.itemsize > 1:
        pixels = pixels.byteswap().view(dtype)  # one copy, only for a foreign byte order
    elif pixels.dtype != dtype:
        pixels = pixels.view(dtype)
    shape = (size[1], size[0]) if comps == 1 else (size[1], size[0], comps)
    pixels = pixels.reshape(shape)
    m = np.eye(4, dtype=np.float64)
    m[0:3, 0] = mat[0:3]
    m[0:3, 1] = mat[3:6]
    m[0:3, 2] = mat[6:9]
    m[0:3, 3] = mat[9:12]
    frame = Frame(
        seq=seq,
        device=header.device,
        pixels=pixels,
        spacing_mm=(_spacing(m[0:3, 0]), _spacing(m[0:3, 1])),
        image_to_reference=m,
        sender_time_ns=header.timestamp_ns,
        receive_wall_ns=receive_wall_ns,
        receive_ns=receive_ns,
        metadata=metadata,
        message_id=message_id,
    )
    return frame, coordinate


def _decode_transform(content: memoryview, common: dict[str, Any]) -> TransformMessage:
    if len(content) < _TRANSFORM.size:
        raise ProtocolError(f"TRANSFORM content of {len(content)} bytes, need {_TRANSFORM.size}")
    v = _TRANSFORM.unpack_from(content, 0)
    m = np.eye(4, dtype=np.float64)
    m[0:3, 0] = v[0:3]
    m[0:3, 1] = v[3:6]
    m[0:3, 2] = v[6:9]
    m[0:3, 3] = v[9:12]
    m.setflags(write=False)
    return TransformMessage(matrix=m, **common)


def _decode_position(content: memoryview, common: dict[str, Any]) -> PositionMessage:
    n = len(content)
    if n not in (12, 24, 28):
        raise ProtocolError(f"POSITION content of {n} bytes (12, 24 or 28 expected)")
    v = struct.unpack_from(f">{n // 4}f", content, 0)
    pos = (v[0], v[1], v[2])
    if n == 12:
        quat = (0.0, 0.0, 0.0, 1.0)
    elif n == 24:
        w2 = 1.0 - (v[3] * v[3] + v[4] * v[4] + v[5] * v[5])
        quat = (v[3], v[4], v[5], math.sqrt(w2) if w2 > 0.0 else 0.0)
    else:
        quat = (v[3], v[4], v[5], v[6])
    return PositionMessage(position=pos, quaternion=quat, **common)


def _decode_point(content: memoryview, common: dict[str, Any]) -> PointMessage:
    n = len(content)
    if n % POINT_ELEMENT_SIZE:
        raise ProtocolError(f"POINT content of {n} bytes is not a multiple of {POINT_ELEMENT_SIZE}")
    items = []
    for off in range(0, n, POINT_ELEMENT_SIZE):
        name, group, r, g, b, a, x, y, z, diameter, owner = _POINT.unpack_from(content, off)
        items.append(PointItem(_cstr(name), (x, y, z), _cstr(group), (r, g, b, a), diameter, _cstr(owner)))
    return PointMessage(points=tuple(items), **common)


def _decode_status(content: memoryview, common: dict[str, Any]) -> StatusMessage:
    if len(content) < STATUS_HEADER_SIZE:
        raise ProtocolError(f"STATUS content of {len(content)} bytes, need at least {STATUS_HEADER_SIZE}")
    code, subcode, name = _STATUS_HEAD.unpack_from(content, 0)
    text = _cstr(bytes(content[STATUS_HEADER_SIZE:]))
    return StatusMessage(code=code, subcode=subcode, error_name=_cstr(name), status_message=text, **common)


def _decode_string(content: memoryview, common: dict[str, Any]) -> StringMessage:
    if len(content) < _STRING_HEAD.size:
        raise ProtocolError(f"STRING content of {len(content)} bytes, need at least {_STRING_HEAD.size}")
    encoding, length = _STRING_HEAD.unpack_from(content, 0)
    if _STRING_HEAD.size + length > len(content):
        raise ProtocolError(
            f"STRING length {length} exceeds its content ({len(content) - _STRING_HEAD.size} bytes)"
        )
    text = _decode_text(bytes(content[_STRING_HEAD.size : _STRING_HEAD.size + length]), encoding)
    return StringMessage(text=text, encoding=encoding, **common)


_DECODERS: Final[Mapping[str, Callable[[memoryview, dict[str, Any]], AnyMessage]]] = MappingProxyType(
    {
        "TRANSFORM": _decode_transform,
        "POSITION": _decode_position,
        "POINT": _decode_point,
        "STATUS": _decode_status,
        "STRING": _decode_string,
    }
)

#: Message types :func:`decode_message` understands (plus any ``GET_``/``STT_``/``STP_``/``RTS_`` query).
KNOWN_TYPES: Final = frozenset({"IMAGE", *_DECODERS})


def is_known_type(message_type: str) -> bool:
    return message_type in KNOWN_TYPES or message_type.startswith(_QUERY_PREFIXES)


# ---------------------------------------------------------------------------------------------- encode


def _encode_text(text: str) -> tuple[bytes, int]:
    try:
        return text.encode("ascii"), ENCODING_US_ASCII
    except UnicodeEncodeError:
        return text.encode("utf-8"), ENCODING_UTF8


def _pack(
    message_type: str,
    device: str,
    content_size: int,
    write_content: Callable[[bytearray, int], None],
    *,
    timestamp_ns: int | None,
    metadata: Mapping[str, str] | None,
    message_id: int,
    version: int,
    crc: bool,
) -> bytearray:
    """Build a whole message in one bytearray; ``write_content(buf, offset)`` fills the content."""
    if version not in (1, 2):
        raise ValueError(f"header version must be 1 or 2, got {version}")
    meta_entries: list[tuple[bytes, bytes, int]] = []
    if metadata:
        if version < 2:
            raise ValueError("metadata needs header version 2")
        for key, value in metadata.items():
            raw_value, enc = _encode_text(value)
            meta_entries.append((key.encode("utf-8"), raw_value, enc))
    meta_header_size = 2 + _META_ENTRY.size * len(meta_entries) if version >= 2 else 0
    meta_size = sum(len(k) + len(v) for k, v, _ in meta_entries)
    ext = EXT_HEADER_SIZE if version >= 2 else 0
    body_size = ext + content_size + meta_header_size + meta_size
    buf = bytearray(HEADER_SIZE + body_size)
    off = HEADER_SIZE
    if version >= 2:
        _EXT_HEADER.pack_into(buf, off, EXT_HEADER_SIZE, meta_header_size, meta_size, message_id)
        off += EXT_HEADER_SIZE
    write_content(buf, off)
    off += content_size
    if version >= 2:
        _U16.pack_into(buf, off, len(meta_entries))
        off += 2
        for k, v, enc in meta_entries:
            _META_ENTRY.pack_into(buf, off, len(k), enc, len(v))
            off += _META_ENTRY.size
        for k, v, _ in meta_entries:
            buf[off : off + len(k)] = k
            off += len(k)
            buf[off : off + len(v)] = v
            off += len(v)
    stamp = ns_to_igtl_timestamp(time.time_ns() if timestamp_ns is None else timestamp_ns)
    checksum = crc64(memoryview(buf)[HEADER_SIZE:]) if crc else 0
    pack_header_into(
        buf,
        0,
        version=version,
        message_type=message_type,
        device=device,
        timestamp=stamp,
        body_size=body_size,
        crc=checksum,
    )
    return buf


def encode_message(
    message_type: str,
    device: str,
    content: BytesLike = b"",
    *,
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
) -> bytearray:
    """Encode any message from raw content bytes (e.g. ``GET_STATUS`` with empty content)."""
    size = len(content)

    def write(buf: bytearray, off: int) -> None:
        buf[off : off + size] = content

    return _pack(
        message_type,
        device,
        size,
        write,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def image_matrix(
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    *,
    slice_spacing_mm: float = 1.0,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> npt.NDArray[np.float64]:
    """Axis-aligned IMAGE matrix: columns are the i/j/k axes scaled by spacing, translation = image centre."""
    m = np.diag([float(spacing_mm[0]), float(spacing_mm[1]), float(slice_spacing_mm), 1.0])
    m[0:3, 3] = centre
    return m


def encode_image(
    pixels: npt.NDArray[np.generic],
    device: str,
    *,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    matrix: npt.ArrayLike | None = None,
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
    coordinate: int = COORD_LPS,
) -> bytearray:
    """Encode a 2-D image ``(rows, cols)`` or ``(rows, cols, components)`` (1-4 components) as IMAGE.

    Args:
        pixels: any supported dtype (int8/uint8/int16/uint16/int32/uint32/float32/float64), either byte
            order (the endian field says which; no byte swapping is done).
        device: device name (<= 20 bytes UTF-8).
        spacing_mm: pixel spacing (x, y); used only when ``matrix`` is None.
        matrix: 4x4 as in :attr:`Frame.image_to_reference`: columns 0-2 are the i/j/k axes scaled by the
            spacing, column 3 the position of the image *centre* (OpenIGTLink convention).
        timestamp_ns: sender wall clock in ns since the epoch; None stamps ``time.time_ns()`` now.
        metadata: v2 metadata (ASCII values sent as US-ASCII, others as UTF-8).
        message_id: v2 message id.
        version: header version 1 or 2.
        crc: compute the CRC-64 (False sends 0 = "not computed").
        coordinate: 1 RAS or 2 LPS.

    Returns:
        The whole message (header + body) as a bytearray.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        rows, cols = arr.shape
        comps = 1
    elif arr.ndim == 3 and 1 <= arr.shape[2] <= 4:
        rows, cols, comps = arr.shape
    else:
        raise ValueError(f"pixels must be (rows, cols) or (rows, cols, 1-4), got shape {arr.shape}")
    if rows > 0xFFFF or cols > 0xFFFF:
        raise ValueError(f"image {cols}x{rows} exceeds the 65535-pixel IMAGE size limit")
    scalar = _DTYPE_TO_SCALAR.get(arr.dtype.newbyteorder("="))
    if scalar is None:
        raise ValueError(f"dtype {arr.dtype} has no OpenIGTLink scalar type")
    if arr.dtype.byteorder == "|" or arr.dtype.isnative:
        endian = _NATIVE_ENDIAN
    else:
        endian = 1 if arr.dtype.byteorder == ">" else 2
    m = image_matrix(spacing_mm) if matrix is None else np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got {m.shape}")
    arr = np.ascontiguousarray(arr)
    nbytes = arr.nbytes
    head = _IMAGE_HEADER.pack(
        1,
        comps,
        scalar,
        endian,
        coordinate,
        cols,
        rows,
        1,
        *m[0:3, 0],
        *m[0:3, 1],
        *m[0:3, 2],
        *m[0:3, 3],
        0,
        0,
        0,
        cols,
        rows,
        1,
    )

    def write(buf: bytearray, off: int) -> None:
        buf[off : off + IMAGE_HEADER_SIZE] = head
        start = off + IMAGE_HEADER_SIZE
        if nbytes:
            buf[start : start + nbytes] = arr.reshape(-1).view(np.uint8).data

    return _pack(
        "IMAGE",
        device,
        IMAGE_HEADER_SIZE + nbytes,
        write,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def encode_transform(
    matrix: npt.ArrayLike,
    device: str,
    *,
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
) -> bytearray:
    """Encode a 4x4 (or 3x4) homogeneous matrix as TRANSFORM (12 float32, column by column)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"TRANSFORM matrix must be 4x4 or 3x4, got {m.shape}")
    content = _TRANSFORM.pack(*m[0:3, 0], *m[0:3, 1], *m[0:3, 2], *m[0:3, 3])
    return encode_message(
        "TRANSFORM",
        device,
        content,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def encode_position(
    position: Sequence[float],
    device: str,
    *,
    quaternion: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
) -> bytearray:
    """Encode POSITION in the spec's full 28-byte form: x y z, then quaternion ``(qx, qy, qz, w)``."""
    if len(position) != 3 or len(quaternion) != 4:
        raise ValueError("POSITION needs a 3-vector position and a 4-vector quaternion (qx, qy, qz, w)")
    content = struct.pack(">7f", *position, *quaternion)
    return encode_message(
        "POSITION",
        device,
        content,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def encode_point(
    points: Sequence[PointItem],
    device: str,
    *,
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
) -> bytearray:
    """Encode POINT (136 bytes per point: name 64, group 32, rgba, xyz, diameter, owner 20)."""
    content = bytearray(POINT_ELEMENT_SIZE * len(points))
    for i, p in enumerate(points):
        _POINT.pack_into(
            content,
            i * POINT_ELEMENT_SIZE,
            _encode_field(p.name, 64, "point name"),
            _encode_field(p.group, 32, "point group"),
            *p.rgba,
            *p.position,
            p.diameter,
            _encode_field(p.owner, 20, "point owner"),
        )
    return encode_message(
        "POINT",
        device,
        content,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def encode_status(
    device: str = "",
    code: int = STATUS_OK,
    *,
    subcode: int = 0,
    error_name: str = "",
    message: str = "",
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
) -> bytearray:
    """Encode STATUS: code u16, subcode u64, error name char[20], NUL-terminated message."""
    text = message.encode("utf-8") + b"\0"
    content = _STATUS_HEAD.pack(code, subcode, _encode_field(error_name, 20, "status error name")) + text
    return encode_message(
        "STATUS",
        device,
        content,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def encode_string(
    text: str,
    device: str,
    *,
    timestamp_ns: int | None = None,
    metadata: Mapping[str, str] | None = None,
    message_id: int = 0,
    version: int = 2,
    crc: bool = True,
) -> bytearray:
    """Encode STRING: encoding u16 (3 US-ASCII when possible, else 106 UTF-8), length u16, bytes."""
    raw, enc = _encode_text(text)
    if len(raw) > 0xFFFF:
        raise ValueError(f"STRING of {len(raw)} bytes exceeds 65535")
    return encode_message(
        "STRING",
        device,
        _STRING_HEAD.pack(enc, len(raw)) + raw,
        timestamp_ns=timestamp_ns,
        metadata=metadata,
        message_id=message_id,
        version=version,
        crc=crc,
    )


def decode_stream(data: BytesLike, *, verify_crc: bool = True) -> list[AnyMessage | None]:
    """Decode a byte string holding whole messages back to back (tests, recordings, fuzzing).

    Raises:
        ProtocolError: truncated or malformed data.
    """
    out: list[AnyMessage | None] = []
    mv = memoryview(data)
    off = 0
    while off < len(mv):
        header = unpack_header(mv[off : off + HEADER_SIZE])
        off += HEADER_SIZE
        if header.body_size > len(mv) - off:
            raise ProtocolError(f"truncated body: {len(mv) - off} of {header.body_size} bytes")
        out.append(decode_message(header, mv[off : off + header.body_size], verify_crc=verify_crc))
        off += header.body_size
    return out
