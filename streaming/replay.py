"""Replay server: send a recording or a PLUS/Slicer sequence file over OpenIGTLink at original timing.

``ReplayServer`` listens on a TCP port (default: any free port on loopback). Once the first client
connects (or immediately with ``wait_for_client=False``) it sends every message at its recorded time
relative to the first one, divided by ``rate``; ``max_speed`` ignores timing; ``loop`` starts over.

Sources:

* a native recording (``.mcap``, see :mod:`streaming.recording`): the ORIGINAL OpenIGTLink bytes, scheduled
  by their recorded monotonic receive times;
* a PLUS/Slicer sequence file (``.igs.mha``, ``.igs.nrrd``, ``.seq.nrrd``): each frame is encoded as an
  OpenIGTLink IMAGE message, scheduled by the per-frame timestamps.

Every message's header timestamp is re-stamped with the actual send time (``time.time_ns``) so that a
receiver on the same host measures transport latency on one clock. The OpenIGTLink header CRC covers the
body only, so patching the timestamp leaves the CRC valid (the body is never touched).

Scheduling: the sender thread waits on an :class:`threading.Event` (so :meth:`ReplayServer.stop` wakes it
at once) until ~``SPIN_NS`` before the deadline, then spins on ``time.perf_counter_ns`` for the rest. This is
a deliberate, bounded busy-wait (at most ``SPIN_NS`` = 1.5 ms per message) because OS sleeps overshoot by
0.1-1 ms. Each message's timing error (actual minus scheduled send time, ns) is kept in a bounded ring
(:data:`TIMING_RING`, oldest overwritten) for jitter statistics (``guidance bench transport``).

Clients that stall (send buffer full for ``send_timeout_s``) or disconnect are dropped and counted; the
replay goes on for the others.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from streaming.recording import RecordingReader
    from streaming.sequence import SequenceFile

logger = logging.getLogger(__name__)

__all__ = ["ReplayError", "ReplayServer", "ReplayStats", "bench_replay", "restamp_header"]

SPIN_NS = 1_500_000  # busy-wait window before each deadline (documented above)
TIMING_RING = 1 << 20  # timing errors kept for statistics (the newest ~1 M messages)
IGTL_HEADER_SIZE = 58
_TS_OFFSET = 34  # offset of the u64 timestamp in the OpenIGTLink header
_TS = struct.Struct(">II")


class ReplayError(RuntimeError):
    """The replay source cannot be opened or the server cannot listen; the message says why."""


def restamp_header(header: bytes | bytearray | memoryview, wall_ns: int) -> bytearray:
    """Return a copy of a 58-byte OpenIGTLink header with its timestamp set to ``wall_ns``.

    The timestamp is seconds (u32) + fraction of a second in 1/2**32 units (u32), big-endian. The CRC
    field covers the body only and stays valid.
    """
    h = bytearray(header[:IGTL_HEADER_SIZE])
    if len(h) != IGTL_HEADER_SIZE:
        raise ValueError(f"OpenIGTLink header must be {IGTL_HEADER_SIZE} bytes, got {len(h)}")
    sec, rem = divmod(wall_ns, 1_000_000_000)
    _TS.pack_into(h, _TS_OFFSET, sec & 0xFFFFFFFF, min((rem << 32) // 1_000_000_000, 0xFFFFFFFF))
    return h


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """A snapshot of the replay's counters.

    ``timing_error_*_ms``: actual minus scheduled send time over the kept messages (NaN before the
    first; not measured with ``max_speed``).
    """

    sent: int
    bytes_sent: int
    loops: int
    clients: int
    clients_dropped: int
    timing_error_p50_ms: float
    timing_error_p99_ms: float
    timing_error_max_ms: float
    finished: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class _Item:
    offset_ns: int  # scheduled time relative to the first message (at rate 1)
    header: bytes | bytearray
    body: bytes | memoryview


class ReplayServer:
    """Serve a recording or sequence file over OpenIGTLink with its original timing.

    Lifecycle: ``start()`` (binds, returns at once; :attr:`port` is then valid) -> ``wait()`` (until the
    replay ends; never with ``loop``) -> ``stop()`` (closes everything within ~1 s). Threads:
    ``guidance-replay-accept`` and ``guidance-replay-send``.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | RecordingReader | SequenceFile,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        rate: float = 1.0,
        max_speed: bool = False,
        loop: bool = False,
        wait_for_client: bool = True,
        device: str = "Image",
        send_timeout_s: float = 2.0,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, got {rate}")
        self._source = source
        self._host = host
        self._req_port = port
        self._rate = rate
        self._max_speed = max_speed
        self._loop = loop
        self._wait_for_client = wait_for_client
        self._device = device
        self._send_timeout_s = send_timeout_s
        self._listener: socket.socket | None = None
        self._port = 0
        self._clients: list[socket.socket] = []
        self._clients_lock = threading.Lock()
        self._client_event = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors = np.zeros(TIMING_RING, dtype=np.int64)
        self._n_timed = 0
        self._sent = 0
        self._bytes = 0
        self._loops = 0
        self._dropped_clients = 0
        self._error: str | None = None
        self._items_factory: Callable[[], Iterator[_Item]] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound TCP port (valid after :meth:`start`)."""
        return self._port

    @property
    def client_count(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    def start(self) -> None:
        """Open the source, bind and start the accept and send threads."""
        if self._threads:
            raise RuntimeError("ReplayServer already started")
        self._items_factory = _open_source(self._source, self._device)
        try:
            listener = socket.create_server((self._host, self._req_port), reuse_port=False)
        except OSError as exc:
            raise ReplayError(
                f"cannot listen on {self._host}:{self._req_port}: {exc.strerror or exc}"
            ) from exc
        listener.settimeout(None)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._threads = [
            threading.Thread(target=self._accept_loop, name="guidance-replay-accept", daemon=True),
            threading.Thread(target=self._send_loop, name="guidance-replay-send", daemon=True),
        ]
        for t in self._threads:
            t.start()
        logger.info(
            "replay listening on %s:%d (rate %g%s%s)",
            self._host,
            self._port,
            self._rate,
            ", max speed" if self._max_speed else "",
            ", loop" if self._loop else "",
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the replay has sent everything (or was stopped); True when it ended."""
        return self._done.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop sending, close the listener and every client, join the threads (bounded by ``timeout``)."""
        self._stop.set()
        self._client_event.set()
        if self._listener is not None:
            _shutdown_listener(self._listener)
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for c in clients:
            _close(c)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.error("replay thread %s did not stop within %.1f s", t.name, timeout)
        self._threads = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._done.set()

    def __enter__(self) -> ReplayServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ stats

    def timing_errors_ns(self) -> npt.NDArray[np.int64]:
        """Timing error (actual - scheduled send time, ns) of the kept messages, oldest first."""
        n = self._n_timed
        if n <= TIMING_RING:
            return self._errors[:n].copy()
        i = n % TIMING_RING
        return np.concatenate([self._errors[i:], self._errors[:i]])

    def stats(self) -> ReplayStats:
        errs = self.timing_errors_ns()
        if errs.size:
            p50, p99 = (float(v) / 1e6 for v in np.percentile(errs, [50, 99]))
            mx = float(errs.max()) / 1e6
        else:
            p50 = p99 = mx = math.nan
        return ReplayStats(
            sent=self._sent,
            bytes_sent=self._bytes,
            loops=self._loops,
            clients=self.client_count,
            clients_dropped=self._dropped_clients,
            timing_error_p50_ms=p50,
            timing_error_p99_ms=p99,
            timing_error_max_ms=mx,
            finished=self._done.is_set(),
            error=self._error,
        )

    # ------------------------------------------------------------------ threads

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, addr = listener.accept()  # blocking; stop() shuts the listener down to wake it
            except OSError:
                if not self._stop.is_set():
                    logger.exception("replay accept failed; no more clients are accepted")
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._send_timeout_s)
            with self._clients_lock:
                if self._stop.is_set():
                    _close(conn)
                    return
                self._clients.append(conn)
            logger.info("replay client connected from %s:%d", addr[0], addr[1])
            self._client_event.set()

    def _send_loop(self) -> None:
        try:
            if self._wait_for_client:
                self._client_event.wait()
            while not self._stop.is_set():
                self._send_pass()
                self._loops += 1
                if not self._loop:
                    break
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            logger.exception("replay stopped on an error")
        finally:
            self._done.set()

    def _send_pass(self) -> None:
        assert self._items_factory is not None
        t0 = time.perf_counter_ns()
        inv_rate = 1.0 / self._rate
        for item in self._items_factory():
            if self._stop.is_set():
                return
            if not self._max_speed:
                deadline = t0 + int(item.offset_ns * inv_rate)
                self._wait_until(deadline)
                if self._stop.is_set():
                    return
                actual = time.perf_counter_ns()
                self._errors[self._n_timed % TIMING_RING] = actual - deadline
                self._n_timed += 1
            header = restamp_header(item.header, time.time_ns())
            self._broadcast(header, item.body)

    def _wait_until(self, deadline_ns: int) -> None:
        remaining = deadline_ns - time.perf_counter_ns()
        if remaining > SPIN_NS:
            # Event wait, not sleep: stop() interrupts it at once.
            self._stop.wait((remaining - SPIN_NS) / 1e9)
        # Deliberate bounded spin (<= SPIN_NS plus wake-up overshoot) for sub-millisecond precision.
        while time.perf_counter_ns() < deadline_ns and not self._stop.is_set():
            pass

    def _broadcast(self, header: bytearray, body: bytes | memoryview) -> None:
        with self._clients_lock:
            clients = list(self._clients)
        size = len(header) + len(body)
        for c in clients:
            try:
                _sendall2(c, header, body)
            except OSError as exc:
                logger.warning("replay client dropped: %s", exc.strerror or type(exc).__name__)
                with self._clients_lock:
                    if c in self._clients:
                        self._clients.remove(c)
                        self._dropped_clients += 1
                _close(c)
                continue
            self._bytes += size
        self._sent += 1


def _sendall2(sock: socket.socket, a: bytes | bytearray, b: bytes | memoryview) -> None:
    """Send ``a`` then ``b`` with one gather syscall where possible (no concatenation copy)."""
    bufs: list[memoryview] = [memoryview(a).cast("B"), memoryview(b).cast("B")]
    while bufs:
        n = sock.sendmsg(bufs)
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        logger.debug("shutdown of a closed socket ignored")
    sock.close()


def _shutdown_listener(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        logger.debug("listener shutdown ignored (not connected)")


# ------------------------------------------------------------------------------------------- sources


def _open_source(
    source: str | os.PathLike[str] | RecordingReader | SequenceFile, device: str
) -> Callable[[], Iterator[_Item]]:
    """Return a factory yielding the scheduled items of one pass over ``source``."""
    from streaming.recording import RecordingError, RecordingReader
    from streaming.sequence import SequenceFile, SequenceFormatError, read_sequence, sequence_format

    if isinstance(source, SequenceFile):
        return _sequence_items(source, device)
    if isinstance(source, RecordingReader):
        return _recording_items(source)
    path = Path(source)
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    try:
        sequence_format(path)
    except SequenceFormatError:
        try:
            reader = RecordingReader(path)
            reader.open()
        except (RecordingError, OSError) as exc:
            raise ReplayError(f"{path.name}: not a recording or sequence file ({exc})") from exc
        return _recording_items(reader)
    try:
        return _sequence_items(read_sequence(path), device)
    except (SequenceFormatError, OSError) as exc:
        raise ReplayError(f"{path.name}: {exc}") from exc


def _recording_items(reader: RecordingReader) -> Callable[[], Iterator[_Item]]:
    def items() -> Iterator[_Item]:
        first: int | None = None
        for msg in reader:
            if first is None:
                first = msg.receive_ns
            yield _Item(msg.receive_ns - first, msg.header, msg.body)

    return items


def _sequence_items(seq: SequenceFile, device: str) -> Callable[[], Iterator[_Item]]:
    """IMAGE per frame (skipped when its ImageStatus is INVALID, as PlusServer does), then one TRANSFORM
    per transform whose status is OK (device = transform name, e.g. ``ProbeToTracker``), same time."""
    from streaming.igtl.codec import encode_transform

    encode = _image_encoder()
    offsets = np.round((seq.timestamps - seq.timestamps[0]) * 1e9).astype(np.int64) if len(seq) else []

    def items() -> Iterator[_Item]:
        for i in range(len(seq)):
            off = int(offsets[i])
            if seq.image_status[i] != "INVALID":
                msg = encode(seq.frames[i], device, seq.spacing)
                yield _Item(off, msg[:IGTL_HEADER_SIZE], memoryview(msg)[IGTL_HEADER_SIZE:])
            for name, mats in seq.transforms.items():
                if seq.transform_status[name][i] == "OK":
                    t = encode_transform(mats[i], name[:20])
                    yield _Item(off, t[:IGTL_HEADER_SIZE], memoryview(t)[IGTL_HEADER_SIZE:])

    return items


def _image_encoder() -> Callable[[npt.NDArray[Any], str, tuple[float, float]], bytes | bytearray]:
    """The transport's IMAGE encoder (v2 header, CRC-64, native byte order)."""
    from streaming.igtl.codec import encode_image

    def enc(pixels: npt.NDArray[Any], device: str, spacing: tuple[float, float]) -> bytes | bytearray:
        return encode_image(pixels, device, spacing_mm=spacing, timestamp_ns=time.time_ns())

    return enc


# --------------------------------------------------------------------------------------------- bench


def bench_replay(
    frames: int = 300, fps: float = 30.0, width: int = 640, height: int = 480, *, rate: float = 1.0
) -> dict[str, float]:
    """Replay a synthetic sequence over loopback to an :class:`~streaming.igtl.IGTLClient` and measure.

    For ``guidance bench transport``. Returns the send-timing error (actual - scheduled, ms: p50, p99,
    max; target p99 <= 1 ms on an idle machine) and the same-clock transport latency (receiver wall clock
    minus the re-stamped header time, ms: p50, p99, max), plus ``sent`` and ``received`` counts.
    """
    from streaming.igtl import IGTLClient
    from streaming.sequence import SequenceFile

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(8, height, width), dtype=np.uint8)
    seq = SequenceFile.from_frames(pool[np.arange(frames) % len(pool)], np.arange(frames) / fps)
    latencies: list[int] = []
    got_all = threading.Event()

    def on_frame(frame: Any) -> None:
        if frame.sender_time_ns is not None:
            latencies.append(frame.receive_wall_ns - frame.sender_time_ns)
        if len(latencies) >= frames:
            got_all.set()

    server = ReplayServer(seq, rate=rate)
    server.start()
    client = IGTLClient(
        "127.0.0.1", server.port, on_frame=on_frame, reconnect=False, name="guidance-bench-replay"
    )
    try:
        client.start()
        server.wait(frames / fps / rate + 30.0)
        got_all.wait(5.0)
    finally:
        client.stop()
        server.stop()
    st = server.stats()
    lat = np.asarray(latencies, dtype=np.float64) / 1e6
    p50, p99, mx = (
        (np.percentile(lat, 50), np.percentile(lat, 99), lat.max()) if lat.size else (math.nan,) * 3
    )
    return {
        "sent": float(st.sent),
        "received": float(lat.size),
        "timing_error_p50_ms": st.timing_error_p50_ms,
        "timing_error_p99_ms": st.timing_error_p99_ms,
        "timing_error_max_ms": st.timing_error_max_ms,
        "latency_p50_ms": float(p50),
        "latency_p99_ms": float(p99),
        "latency_max_ms": float(mx),
    }
