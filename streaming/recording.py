"""Native recording container: original OpenIGTLink messages + receive times, session metadata, markers.

The container is MCAP (https://mcap.dev), an append-only, chunked, well-kept format with a Python reader
and writer (and viewers such as Foxglove). Layout of a recording written by :class:`RecordingWriter`:

* Metadata record ``"session"``: ``{"json": <session metadata as JSON>, "format": "guidance-recording",
  "format_version": "1"}``. Written (and fsynced) right after the file header, before any message.
* Channel ``/igtl`` (message encoding ``openigtlink``): one MCAP message per OpenIGTLink message; the data
  is the ORIGINAL bytes, header (58 bytes) + body, untouched. ``log_time`` = ``receive_wall_ns``
  (``time.time_ns`` of the recording process), ``publish_time`` = ``receive_ns``
  (``time.perf_counter_ns`` of the recording process, used for replay timing), ``sequence`` = running
  count (mod 2**32).
* Channel ``/markers`` (``json``): ``{"label": str, "wall_ns": int}`` with ``log_time`` = ``wall_ns``.
* Channels ``/results/<encoding>`` (message encoding = ``<encoding>``): opaque per-frame results written
  by the pipeline; ``publish_time`` = the frame's ``receive_ns``, ``sequence`` = the frame's seq.

Crash safety: messages are gathered in chunks of at most ``chunk_size`` bytes, and the chunk in progress
is written out at least every ``flush_interval_s`` (0.5 s) and the file fsynced every ``fsync_interval_s``
(1 s), so a process killed with SIGKILL (or a power cut, up to the fsync interval) leaves a file that
:class:`RecordingReader` reads up to the last flush. The reader walks the file sequentially with MCAP's
stream reader, so it needs neither the footer nor the summary, and it stops cleanly at a truncated tail.

Errors: any failure to write (disk full, file size limit, I/O error) raises :class:`RecordingWriteError`;
the writer stops writing (so the file keeps a clean prefix plus at most one partial record, which the
reader ignores) and every later call raises the same error type.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from mcap.exceptions import McapError
from mcap.records import Channel, Footer, Message, Metadata
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer

from streaming.frame import Frame

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "Marker",
    "RawMessageLike",
    "RecordedMessage",
    "RecordedResult",
    "RecordingError",
    "RecordingReader",
    "RecordingWriteError",
    "RecordingWriter",
    "recording_to_sequence",
    "sequence_to_recording",
]

FORMAT_NAME = "guidance-recording"
FORMAT_VERSION = "1"
IGTL_TOPIC = "/igtl"
MARKER_TOPIC = "/markers"
RESULT_TOPIC_PREFIX = "/results/"
IGTL_HEADER_SIZE = 58
_HEADER_FIELDS = struct.Struct(">H12s20s")
_TRUNCATION_ERRORS: tuple[type[BaseException], ...] = (
    McapError,
    struct.error,
    zlib.error,
    ValueError,
    EOFError,
)
try:  # a chunk cut short by a crash fails to decompress with the codec's own error type
    import zstandard

    _TRUNCATION_ERRORS += (zstandard.ZstdError,)
except ImportError:  # pragma: no cover - zstandard comes with mcap's usual installs
    logger.debug("zstandard not installed: zstd recordings cannot be read")
_COMPRESSION = {"none": CompressionType.NONE, "lz4": CompressionType.LZ4, "zstd": CompressionType.ZSTD}


class RecordingError(Exception):
    """A recording cannot be opened or read (not an MCAP file, not ours, unreadable)."""


class RecordingWriteError(RecordingError):
    """Writing failed (disk full, size limit, I/O error); what was written before stays readable."""


class RawMessageLike(Protocol):
    """What the writer needs of a received message (``streaming.igtl.wire.RawMessage`` fits)."""

    @property
    def header(self) -> bytes: ...
    @property
    def body(self) -> bytes: ...
    @property
    def receive_wall_ns(self) -> int: ...
    @property
    def receive_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One recorded OpenIGTLink message, exactly as received."""

    header: bytes
    body: bytes
    receive_wall_ns: int
    receive_ns: int
    type: str
    device: str


@dataclass(frozen=True, slots=True)
class Marker:
    """A labelled point in time (wall clock, ns since the epoch)."""

    wall_ns: int
    label: str


@dataclass(frozen=True, slots=True)
class RecordedResult:
    """One pipeline result stored with the recording (payload format named by ``encoding``)."""

    seq: int
    receive_ns: int
    wall_ns: int
    encoding: str
    payload: bytes


def _split_header(data: bytes) -> tuple[str, str]:
    """(type, device) from the first bytes of an OpenIGTLink header (no validation beyond that)."""
    _, raw_type, raw_device = _HEADER_FIELDS.unpack_from(data, 0)
    return (
        raw_type.split(b"\0", 1)[0].decode("ascii", "replace"),
        raw_device.split(b"\0", 1)[0].decode("utf-8", "replace"),
    )


# ---------------------------------------------------------------------------------------------- writer


class RecordingWriter:
    """Append OpenIGTLink messages, markers and results to a new recording file.

    Not thread-safe: one thread writes (the app uses :class:`guidance.recorder.Recorder`, which owns a
    thread and a bounded queue). Lifecycle: ``open()`` -> ``write_message()``/``add_marker()``/
    ``write_result()`` ... -> ``close()``; also a context manager.

    Args:
        path: the file to create (must not exist: recordings are never overwritten).
        metadata: session metadata, JSON-serialisable (app version, source host/port, session id, study
            fields). Stored in the file; never logged.
        chunk_size: bytes per MCAP chunk before it is written out.
        compression: ``"none"`` (default: ultrasound noise compresses poorly and CPU is precious),
            ``"lz4"`` or ``"zstd"``.
        flush_interval_s: the chunk in progress is written out at least this often (crash safety).
        fsync_interval_s: the file is fsynced at least this often (power-cut safety).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        chunk_size: int = 4 * 1024 * 1024,
        compression: str = "none",
        flush_interval_s: float = 0.5,
        fsync_interval_s: float = 1.0,
    ) -> None:
        if compression not in _COMPRESSION:
            raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
        self.path = Path(path)
        self._metadata_json = json.dumps(dict(metadata or {}), sort_keys=True, default=str)
        self._chunk_size = chunk_size
        self._compression = _COMPRESSION[compression]
        self._flush_ns = int(flush_interval_s * 1e9)
        self._fsync_ns = int(fsync_interval_s * 1e9)
        self._file: io.BufferedWriter | None = None
        self._writer: Writer | None = None
        self._igtl_channel = 0
        self._marker_channel = 0
        self._result_channels: dict[str, int] = {}
        self._count = 0
        self._bytes = 0
        self._last_flush = 0
        self._last_fsync = 0
        self._failed: RecordingWriteError | None = None
        self._closed = False
        self._dirty = False

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the file and write the header and session metadata (fsynced)."""
        if self._writer is not None:
            raise RuntimeError("RecordingWriter already open")
        try:
            raw = open(self.path, "xb", buffering=0)  # noqa: SIM115 - owned and closed by close()
        except FileExistsError as exc:
            raise RecordingError(f"{self.path}: already exists (recordings are never overwritten)") from exc
        except OSError as exc:
            raise RecordingWriteError(f"{self.path}: cannot create ({exc.strerror or exc})") from exc
        self._file = io.BufferedWriter(raw, buffer_size=1024 * 1024)
        with self._guard("writing the file header"):
            w = Writer(
                self._file,
                chunk_size=self._chunk_size,
                compression=self._compression,
                enable_crcs=True,
            )
            w.start(profile="", library=f"{FORMAT_NAME}/{FORMAT_VERSION}")
            w.add_metadata(
                "session",
                {"json": self._metadata_json, "format": FORMAT_NAME, "format_version": FORMAT_VERSION},
            )
            self._igtl_channel = w.register_channel(
                IGTL_TOPIC,
                "openigtlink",
                0,
                {
                    "data": "OpenIGTLink header+body as received",
                    "log_time": "receive_wall_ns (time.time_ns)",
                    "publish_time": "receive_ns (time.perf_counter_ns)",
                },
            )
            self._marker_channel = w.register_channel(MARKER_TOPIC, "json", 0)
            self._writer = w
            self._sync(fsync=True)
        logger.info("recording to %s", self.path)

    def close(self) -> None:
        """Write the summary and footer, fsync and close. Idempotent; after a write error it only closes."""
        if self._closed:
            return
        self._closed = True
        w, f = self._writer, self._file
        self._writer = None
        self._file = None
        if f is None:
            return
        try:
            if w is not None and self._failed is None:
                with self._guard("finishing the file"):
                    w.finish()  # type: ignore[no-untyped-call]
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            try:
                f.close()
            except OSError as exc:
                # Only reachable after a write error already raised to the caller: the buffered tail is lost.
                logger.warning("closing %s after a write error: %s", self.path.name, exc.strerror or exc)
        logger.info("recording closed: %s (%d messages, %d bytes)", self.path.name, self._count, self._bytes)

    def __enter__(self) -> RecordingWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    @property
    def message_count(self) -> int:
        return self._count

    @property
    def bytes_written(self) -> int:
        """Message payload bytes handed to the container (before MCAP framing)."""
        return self._bytes

    def write_message(self, raw: RawMessageLike) -> None:
        """Append one OpenIGTLink message (header + body bytes) with its receive stamps."""
        w = self._ready()
        header, body = raw.header, raw.body
        if len(header) != IGTL_HEADER_SIZE:
            raise ValueError(f"OpenIGTLink header must be {IGTL_HEADER_SIZE} bytes, got {len(header)}")
        data = bytes(header) + bytes(body)
        with self._guard("writing a message"):
            w.add_message(
                self._igtl_channel,
                log_time=raw.receive_wall_ns,
                data=data,
                publish_time=raw.receive_ns,
                sequence=self._count & 0xFFFFFFFF,
            )
            self._count += 1
            self._bytes += len(data)
            self._dirty = True
            self.maybe_flush()

    def add_marker(self, label: str, wall_ns: int | None = None) -> Marker:
        """Add a marker (now, or at ``wall_ns``); written out at once."""
        w = self._ready()
        marker = Marker(time.time_ns() if wall_ns is None else int(wall_ns), str(label))
        payload = json.dumps({"label": marker.label, "wall_ns": marker.wall_ns}).encode()
        with self._guard("writing a marker"):
            w.add_message(
                self._marker_channel,
                log_time=marker.wall_ns,
                data=payload,
                publish_time=time.perf_counter_ns(),
            )
            self._sync(fsync=False)
        return marker

    def write_result(self, seq: int, receive_ns: int, payload: bytes, encoding: str) -> None:
        """Append an opaque per-frame result (label map, tip geometry...) on ``/results/<encoding>``."""
        w = self._ready()
        ch = self._result_channels.get(encoding)
        with self._guard("writing a result"):
            if ch is None:
                ch = w.register_channel(RESULT_TOPIC_PREFIX + encoding, encoding, 0)
                self._result_channels[encoding] = ch
            w.add_message(
                ch,
                log_time=time.time_ns(),
                data=bytes(payload),
                publish_time=receive_ns,
                sequence=seq & 0xFFFFFFFF,
            )
            self._dirty = True
            self.maybe_flush()

    def maybe_flush(self, now_ns: int | None = None) -> None:
        """Write out the chunk in progress if ``flush_interval_s`` has passed (and fsync when due)."""
        if self._writer is None:
            return
        now = time.perf_counter_ns() if now_ns is None else now_ns
        if now - self._last_flush >= self._flush_ns:
            with self._guard("flushing"):
                self._sync(fsync=now - self._last_fsync >= self._fsync_ns, now=now)

    def flush(self, *, fsync: bool = True) -> None:
        """Write out the chunk in progress now (and fsync)."""
        self._ready()
        with self._guard("flushing"):
            self._sync(fsync=fsync)

    @property
    def next_flush_in_s(self) -> float | None:
        """Seconds until pending data must be flushed (a writer thread's wait timeout); None: none pending."""
        if not self._dirty or self._writer is None:
            return None
        return max(0.0, (self._last_flush + self._flush_ns - time.perf_counter_ns()) / 1e9)

    def _sync(self, *, fsync: bool, now: int | None = None) -> None:
        assert self._writer is not None or self._file is not None
        if self._writer is not None:
            self._writer.flush()  # type: ignore[no-untyped-call]
        now = time.perf_counter_ns() if now is None else now
        self._last_flush = now
        self._dirty = False
        if fsync and self._file is not None:
            os.fsync(self._file.fileno())
            self._last_fsync = now

    def _ready(self) -> Writer:
        if self._failed is not None:
            raise RecordingWriteError(str(self._failed))
        if self._writer is None:
            raise RecordingError(
                "RecordingWriter is not open" if not self._closed else "RecordingWriter is closed"
            )
        return self._writer

    def _guard(self, what: str) -> _WriteGuard:
        return _WriteGuard(self, what)


class _WriteGuard:
    """Turn OSError into RecordingWriteError and put the writer in the failed state."""

    __slots__ = ("_owner", "_what")

    def __init__(self, owner: RecordingWriter, what: str) -> None:
        self._owner = owner
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            err = RecordingWriteError(f"{self._owner.path.name}: {self._what} failed: {exc.strerror or exc}")
            self._owner._failed = err  # noqa: SLF001 - the guard is part of the writer
            logger.error("%s", err)
            raise err from exc


# ---------------------------------------------------------------------------------------------- reader


class RecordingReader:
    """Read a recording, including one whose writer was killed (no footer, truncated last chunk).

    Iterating yields :class:`RecordedMessage` in file order. :attr:`metadata`, :attr:`markers`,
    :attr:`message_count`, :attr:`duration_s` come from one sequential scan done on first use.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._scanned = False
        self._metadata: Mapping[str, Any] = MappingProxyType({})
        self._markers: list[Marker] = []
        self._count = 0
        self._first_ns: int | None = None
        self._last_ns: int | None = None
        self._complete = False
        self._results = 0

    def open(self) -> RecordingReader:
        """Check that the file is one of our recordings (reads only its first records); returns self.

        Raises:
            RecordingError: not an MCAP file, or no session metadata where our writer puts it.
        """
        try:
            with open(self.path, "rb") as f:
                records = StreamReader(f).records
                for _ in range(4):  # Header, then our "session" Metadata record
                    rec = next(records)
                    if isinstance(rec, Metadata) and rec.name == "session":
                        return self
        except OSError as exc:
            raise RecordingError(f"{self.path}: cannot open ({exc.strerror or exc})") from exc
        except StopIteration as exc:
            raise RecordingError(f"{self.path.name}: not a recording (empty)") from exc
        except _TRUNCATION_ERRORS as exc:
            raise RecordingError(f"{self.path.name}: not a recording ({type(exc).__name__})") from exc
        raise RecordingError(f"{self.path.name}: not a guidance recording (no session metadata)")

    def __iter__(self) -> Iterator[RecordedMessage]:
        for ch, msg in self._records():
            if ch.topic == IGTL_TOPIC and len(msg.data) >= IGTL_HEADER_SIZE:
                data = msg.data
                mtype, device = _split_header(data)
                yield RecordedMessage(
                    header=data[:IGTL_HEADER_SIZE],
                    body=data[IGTL_HEADER_SIZE:],
                    receive_wall_ns=msg.log_time,
                    receive_ns=msg.publish_time,
                    type=mtype,
                    device=device,
                )

    def frames(self, device: str | None = None, *, verify_crc: bool = True) -> Iterator[Frame]:
        """Decode the recorded IMAGE messages (optionally of one device) to Frames, numbered from 0."""
        from streaming.igtl.codec import decode_image, unpack_header

        seq = 0
        for m in self:
            if m.type != "IMAGE" or (device is not None and m.device != device):
                continue
            header = unpack_header(m.header)
            yield decode_image(
                header,
                m.body,
                verify_crc=verify_crc,
                seq=seq,
                receive_wall_ns=m.receive_wall_ns,
                receive_ns=m.receive_ns,
            )
            seq += 1

    def results(self) -> Iterator[RecordedResult]:
        for ch, msg in self._records():
            if ch.topic.startswith(RESULT_TOPIC_PREFIX):
                yield RecordedResult(
                    msg.sequence, msg.publish_time, msg.log_time, ch.message_encoding, msg.data
                )

    @property
    def metadata(self) -> Mapping[str, Any]:
        self._scan()
        return self._metadata

    @property
    def markers(self) -> list[Marker]:
        self._scan()
        return list(self._markers)

    @property
    def message_count(self) -> int:
        self._scan()
        return self._count

    @property
    def result_count(self) -> int:
        self._scan()
        return self._results

    @property
    def duration_s(self) -> float:
        """Recorded span between the first and last message receive times (monotonic clock)."""
        self._scan()
        if self._first_ns is None or self._last_ns is None:
            return 0.0
        return (self._last_ns - self._first_ns) / 1e9

    @property
    def complete(self) -> bool:
        """True when the file was closed properly (footer present); False after a crash."""
        self._scan()
        return self._complete

    def _scan(self) -> None:
        if self._scanned:
            return
        markers: list[Marker] = []
        count = results = 0
        first = last = None
        for ch, msg in self._records(with_meta=True):
            if ch.topic == IGTL_TOPIC:
                count += 1
                if first is None:
                    first = msg.publish_time
                last = msg.publish_time
            elif ch.topic == MARKER_TOPIC:
                try:
                    d = json.loads(msg.data)
                    markers.append(Marker(int(d["wall_ns"]), str(d["label"])))
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: skipping a malformed marker", self.path.name)
            elif ch.topic.startswith(RESULT_TOPIC_PREFIX):
                results += 1
        self._markers = sorted(markers, key=lambda m: m.wall_ns)
        self._count, self._results = count, results
        self._first_ns, self._last_ns = first, last
        self._scanned = True

    def _records(self, *, with_meta: bool = False) -> Iterator[tuple[Channel, Message]]:
        """(channel, message) pairs in file order; stops quietly at a truncated tail."""
        channels: dict[int, Channel] = {}
        seen_session = footer_seen = False
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise RecordingError(f"{self.path}: cannot open ({exc.strerror or exc})") from exc
        offset_note = ""
        try:
            reader = StreamReader(f, validate_crcs=True)
            records = reader.records
            while True:
                try:
                    rec = next(records)
                except StopIteration:
                    if with_meta:
                        self._complete = footer_seen  # footer and closing magic both intact
                    break
                except _TRUNCATION_ERRORS as exc:
                    if not seen_session:
                        raise RecordingError(f"{self.path.name}: not a recording ({exc})") from exc
                    offset_note = f"{type(exc).__name__} at byte {f.tell()}"
                    break
                if isinstance(rec, Channel):
                    channels[rec.id] = rec
                elif isinstance(rec, Message):
                    ch = channels.get(rec.channel_id)
                    if ch is not None:
                        yield ch, rec
                elif isinstance(rec, Metadata) and rec.name == "session":
                    seen_session = True
                    if with_meta:
                        self._metadata = MappingProxyType(json.loads(rec.metadata.get("json", "{}")))
                elif isinstance(rec, Footer):
                    footer_seen = True
        finally:
            f.close()
        if not seen_session:
            raise RecordingError(f"{self.path.name}: not a guidance recording (no session metadata)")
        if offset_note and with_meta:
            logger.warning(
                "%s: recording ends early (%s); read up to the last complete chunk",
                self.path.name,
                offset_note,
            )


# ------------------------------------------------------------------------------------ import / export

_TRANSFORM_DEVICE = re.compile(r"^\w+To\w+$")


def recording_to_sequence(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device: str | None = None,
    compress: bool = True,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Export the IMAGE messages of one device (default: the first seen) to a PLUS/Slicer sequence file.

    Timestamps are the receive wall-clock times in seconds since the epoch. Each frame's IMAGE matrix is
    stored as ``ImageToReference``; TRANSFORM messages from devices named ``<From>To<To>`` become
    per-frame ``<From>To<To>Transform`` fields (the latest received at or before the frame; ``INVALID``
    before the first). Frames whose size differs from the first are skipped (logged). Session metadata
    is not copied into the file (it may hold patient data). Holds all frames in memory.

    Returns:
        The number of frames written.
    """
    from streaming.igtl.codec import TransformMessage, decode_image, decode_message, unpack_header
    from streaming.sequence import SequenceFile, write_sequence

    reader = RecordingReader(source)
    pixels: list[npt.NDArray[Any]] = []
    stamps: list[float] = []
    image_mats: list[npt.NDArray[np.float64]] = []
    spacing: tuple[float, float] = (1.0, 1.0)
    latest: dict[str, npt.NDArray[np.float64]] = {}
    per_frame_tf: list[dict[str, npt.NDArray[np.float64]]] = []
    skipped = 0
    for m in reader:
        if m.type == "TRANSFORM" and _TRANSFORM_DEVICE.match(m.device):
            msg = decode_message(unpack_header(m.header), m.body, verify_crc=False)
            if isinstance(msg, TransformMessage):
                latest[m.device] = np.array(msg.matrix, dtype=np.float64)
            continue
        if m.type != "IMAGE":
            continue
        if device is None:
            device = m.device
        if m.device != device:
            continue
        frame = decode_image(unpack_header(m.header), m.body, verify_crc=True)
        if pixels and frame.pixels.shape != pixels[0].shape:
            skipped += 1
            continue
        if not pixels:
            spacing = frame.spacing_mm
        pixels.append(frame.pixels)
        stamps.append(m.receive_wall_ns / 1e9)
        image_mats.append(np.array(frame.image_to_reference))
        per_frame_tf.append(dict(latest))
        if progress is not None:
            progress(len(pixels))
    if not pixels:
        raise RecordingError(
            f"{Path(source).name}: no IMAGE messages{f' from device {device}' if device else ''}"
        )
    if skipped:
        logger.warning("export: skipped %d frames whose size differs from the first", skipped)
    n = len(pixels)
    transforms: dict[str, npt.NDArray[np.float64]] = {"ImageToReference": np.stack(image_mats)}
    status: dict[str, tuple[str, ...]] = {"ImageToReference": ("OK",) * n}
    names = sorted({k for d in per_frame_tf for k in d})
    for name in names:
        mats = np.tile(np.eye(4), (n, 1, 1))
        st = []
        for i, d in enumerate(per_frame_tf):
            if name in d:
                mats[i] = d[name]
                st.append("OK")
            else:
                st.append("INVALID")
        transforms[name] = mats
        status[name] = tuple(st)
    seq = SequenceFile(
        frames=np.stack(pixels),
        timestamps=np.asarray(stamps),
        transforms=transforms,
        transform_status=status,
        spacing=spacing,
        metadata={"UltrasoundImageOrientation": "MF"},
    )
    write_sequence(seq, out, compress=compress)
    return n


def sequence_to_recording(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device: str = "Image",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Import a PLUS/Slicer sequence file as a native recording (replayable at the file's timing).

    Each frame becomes an IMAGE message (v2 header, metadata ``Timestamp``/``ImageStatus``) followed by a
    TRANSFORM message per transform whose status is OK (device = the transform name). Receive times are
    the import wall clock plus the frame's offset from the first timestamp. Returns the frame count.
    """
    from streaming.igtl.codec import encode_image, encode_transform
    from streaming.sequence import read_sequence

    src = Path(source)
    seq = read_sequence(src)
    meta: dict[str, Any] = {
        "imported_from": src.name,
        "source_format": seq.format,
        "sequence": dict(seq.metadata),
    }
    wall0, mono0 = time.time_ns(), time.perf_counter_ns()
    t0 = float(seq.timestamps[0]) if len(seq) else 0.0
    with RecordingWriter(out, meta) as w:
        for i, frame in enumerate(seq.iter_frames(device)):
            off = round((float(seq.timestamps[i]) - t0) * 1e9)
            wall, mono = wall0 + off, mono0 + off
            md = {"Timestamp": frame.metadata["Timestamp"], "ImageStatus": seq.image_status[i]}
            msg = encode_image(frame.pixels, device, spacing_mm=seq.spacing, timestamp_ns=wall, metadata=md)
            w.write_message(_Raw(bytes(msg[:IGTL_HEADER_SIZE]), bytes(msg[IGTL_HEADER_SIZE:]), wall, mono))
            for name, mats in seq.transforms.items():
                if seq.transform_status[name][i] != "OK":
                    continue
                tmsg = encode_transform(mats[i], name[:20], timestamp_ns=wall)
                w.write_message(
                    _Raw(bytes(tmsg[:IGTL_HEADER_SIZE]), bytes(tmsg[IGTL_HEADER_SIZE:]), wall, mono)
                )
            if progress is not None:
                progress(i + 1)
    return len(seq)


@dataclass(frozen=True, slots=True)
class _Raw:
    header: bytes
    body: bytes
    receive_wall_ns: int
    receive_ns: int
