"""OpenIGTLink client: one receiver thread, blocking exact-length reads, reconnect with backoff.

Buffer ownership (deliberate): the 58-byte header buffer is reused for every message; an IMAGE body is
received with ``recv_into`` straight into a *fresh* ``bytearray`` of exactly ``body_size`` bytes and the
Frame's pixels are a read-only ``np.frombuffer`` view of it. That is one allocation and zero copies per
image, and the Frame stays valid however long a consumer keeps it (the next message never overwrites
it). Pooling image buffers would save the allocation (~µs, pages are touched by recv anyway) but would
need a release protocol with every consumer of the frame; not worth it. Other known types (TRANSFORM,
STATUS...) are read into one reusable grow-only buffer and decoded into new objects at once; unknown
types and filtered-out devices are skipped through a fixed 64 KiB scratch buffer.

Lifecycle: ``start()`` -> ``stop(timeout)``. ``stop`` interrupts everything the thread can block on:
the connect (a wake-up socket pair in the same ``select``), a blocking ``recv`` (``shutdown`` of the
socket) and the backoff wait (``Event.wait``). While disconnected the thread sleeps in that wait:
zero CPU, no polling.
"""

from __future__ import annotations

import errno
import logging
import random
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from streaming.frame import Frame
from streaming.igtl.codec import (
    STATUS_OK,
    AnyMessage,
    Header,
    check_crc,
    decode_image,
    decode_message,
    encode_status,
    is_known_type,
)
from streaming.igtl.crc64 import BytesLike
from streaming.igtl.errors import CrcError, FramingError, ProtocolError, UnsupportedContentError
from streaming.igtl.wire import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    MessageReader,
    PeerClosed,
    RawMessage,
    stamp,
    tune_socket,
)

logger = logging.getLogger(__name__)

State = Literal["connecting", "connected", "disconnected", "stopped"]


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A change of connection state, with a human-readable reason."""

    state: State
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Snapshot of a client's counters (see :attr:`IGTLClient.stats`)."""

    frames: int
    messages: int
    bytes: int
    reconnects: int
    crc_errors: int
    protocol_errors: int
    unknown_skipped: int
    filtered: int
    callback_errors: int
    connected: bool
    last_error: str


class IGTLClient:
    """Receive OpenIGTLink messages from a server (PlusServer, a scanner, our replay server).

    Args:
        host, port: server address.
        on_frame: called on the receiver thread with each IMAGE as a :class:`Frame` (keep it short:
            hand the frame to a ``LatestSlot``).
        on_message: called with every other decoded message (TRANSFORM, STATUS, ...).
        on_raw: called with every message as received (header + body bytes); only built when set.
        on_state: called on connection state changes.
        device_filter: when non-empty, IMAGE messages of other devices are skipped (counted in
            ``filtered``).
        reconnect: reconnect after a disconnect (exponential backoff with jitter).
        backoff_initial_s, backoff_max_s: backoff bounds.
        max_body_bytes: larger bodies close the connection (nothing is allocated for them).
        stall_timeout_s: a peer that sends nothing for this long inside a message is disconnected.
        connect_timeout_s: limit for one connection attempt.
        verify_crc: check the CRC-64 when the sender set one.
        hello: send a v2 STATUS on connect so that PlusServer answers in header version 2.
        name: thread name (must start with ``guidance-``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        on_frame: Callable[[Frame], None],
        on_message: Callable[[AnyMessage], None] | None = None,
        on_raw: Callable[[RawMessage], object] | None = None,
        on_state: Callable[[ConnectionEvent], None] | None = None,
        device_filter: str = "",
        reconnect: bool = True,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        connect_timeout_s: float = 5.0,
        verify_crc: bool = True,
        hello: bool = True,
        name: str = "guidance-igtl-client",
    ) -> None:
        self.host = host
        self.port = port
        self._on_frame = on_frame
        self._on_message = on_message
        self._on_raw = on_raw
        self._on_state = on_state
        self._device_filter = device_filter
        self._reconnect = reconnect
        self._backoff_initial = max(0.0, backoff_initial_s)
        self._backoff_max = max(self._backoff_initial, backoff_max_s)
        self._max_body = max_body_bytes
        self._stall_timeout = stall_timeout_s
        self._connect_timeout = connect_timeout_s
        self._verify_crc = verify_crc
        self._hello = hello
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._connected = threading.Event()
        # Counters: written by the receiver thread only, read (racily but atomically) by others.
        self._seq = 0
        self._frames = 0
        self._messages = 0
        self._bytes = 0
        self._reconnects = 0
        self._crc_errors = 0
        self._protocol_errors = 0
        self._unknown = 0
        self._filtered = 0
        self._callback_errors = 0
        self._last_error = ""

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the receiver thread (it connects, and reconnects when ``reconnect``)."""
        if self._thread is not None:
            raise RuntimeError("IGTLClient already started")
        self._stop.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the receiver thread and close the connection; True when it ended within ``timeout``."""
        thread = self._thread
        if thread is None:
            return True
        self._stop.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError as exc:
                logger.debug("wake-up send failed: %s", exc)
        self._shutdown_socket()
        thread.join(timeout)
        stopped = not thread.is_alive()
        if stopped:
            self._thread = None
            for s in (self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self._wake_r = self._wake_w = None
        else:
            logger.error("%s did not stop within %.1f s", self._name, timeout)
        return stopped

    def __enter__(self) -> IGTLClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (for tests and tools); False on timeout."""
        return self._connected.wait(timeout)

    @property
    def stats(self) -> ClientStats:
        return ClientStats(
            frames=self._frames,
            messages=self._messages,
            bytes=self._bytes,
            reconnects=self._reconnects,
            crc_errors=self._crc_errors,
            protocol_errors=self._protocol_errors,
            unknown_skipped=self._unknown,
            filtered=self._filtered,
            callback_errors=self._callback_errors,
            connected=self._connected.is_set(),
            last_error=self._last_error,
        )

    def set_on_raw(self, on_raw: Callable[[RawMessage], object] | None) -> None:
        """Start (or, with None, stop) delivering raw messages, e.g. when a recording starts or stops.

        Takes effect from the next message; one reference store, safe from any thread. While it is None the
        receiver builds no :class:`RawMessage` at all (no copy on the hot path when nobody records).
        """
        self._on_raw = on_raw

    def send(self, data: BytesLike) -> bool:
        """Send one encoded message to the server (e.g. a result); False when not connected or it failed.

        Blocks until the kernel took the bytes; call it from a worker thread, never the GUI thread.
        """
        with self._sock_lock:
            sock = self._sock
        if sock is None or not self._connected.is_set():
            return False
        try:
            with self._send_lock:
                sock.sendall(data)
        except OSError as exc:
            logger.warning("send to %s:%d failed: %s", self.host, self.port, exc)
            return False
        return True

    # ------------------------------------------------------------------------------------- thread

    def _emit(self, state: State, reason: str = "") -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(ConnectionEvent(state, reason))
        except Exception:
            self._callback_errors += 1
            logger.exception("on_state callback failed")

    def _shutdown_socket(self) -> None:
        with self._sock_lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:  # not connected (yet/anymore): nothing to interrupt
                logger.debug("shutdown: %s", exc)

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                self._emit("connecting", f"{self.host}:{self.port}")
                sock, reason = self._connect()
                if sock is not None:
                    self._connected.set()
                    self._emit("connected", f"{self.host}:{self.port}")
                    logger.info("connected to %s:%d", self.host, self.port)
                    got_any, reason = self._serve(sock)
                    self._connected.clear()
                    with self._sock_lock:
                        self._sock = None
                    sock.close()
                    if got_any:
                        attempt = 0  # a working connection resets the backoff
                    if self._stop.is_set():
                        break
                    logger.warning("disconnected from %s:%d: %s", self.host, self.port, reason)
                    self._emit("disconnected", reason)
                elif self._stop.is_set():
                    break
                else:
                    logger.debug("connect to %s:%d failed: %s", self.host, self.port, reason)
                    self._emit("disconnected", reason)
                self._last_error = reason
                if not self._reconnect:
                    break
                delay = min(self._backoff_max, self._backoff_initial * (2.0**attempt))
                delay *= random.uniform(0.5, 1.0)  # jitter, not cryptography
                attempt = min(attempt + 1, 30)
                if self._stop.wait(delay):
                    break
                self._reconnects += 1
        finally:
            self._connected.clear()
            self._emit("stopped", "stop requested" if self._stop.is_set() else self._last_error)

    def _connect(self) -> tuple[socket.socket | None, str]:
        """One connection attempt, interruptible by :meth:`stop`."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return None, f"cannot resolve {self.host}: {exc}"
        family, stype, proto, _, addr = infos[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                assert self._wake_r is not None
                _, writable, _ = select.select([self._wake_r], [sock], [], self._connect_timeout)
                if self._stop.is_set():
                    sock.close()
                    return None, "stop requested"
                if not writable:
                    sock.close()
                    return None, f"connect timed out after {self._connect_timeout:.1f} s"
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sock.close()
                return None, f"connect failed: {errno.errorcode.get(err, err)} ({err})"
            sock.setblocking(True)
            tune_socket(sock)
            with self._sock_lock:
                self._sock = sock
            if self._stop.is_set():  # stop() may have run before _sock was visible to it
                with self._sock_lock:
                    self._sock = None
                sock.close()
                return None, "stop requested"
            if self._hello:
                # Any header-v2 message makes PlusServer answer this client in v2 (with metadata).
                sock.sendall(encode_status("", STATUS_OK, version=2))
        except OSError as exc:
            with self._sock_lock:
                self._sock = None
            sock.close()
            return None, f"connect failed: {exc}"
        return sock, ""

    def _serve(self, sock: socket.socket) -> tuple[bool, str]:
        """Receive until the connection ends; return (received anything, reason it ended)."""
        reader = MessageReader(sock, max_body_bytes=self._max_body, stall_timeout_s=self._stall_timeout)
        got_any = False
        try:
            while True:
                header = reader.read_header()
                got_any = True
                self._bytes += 58 + header.body_size
                self._handle(reader, header)
        except PeerClosed as exc:
            return got_any, "stop requested" if self._stop.is_set() else str(exc)
        except CrcError as exc:
            self._crc_errors += 1
            return got_any, self._fail(str(exc))
        except FramingError as exc:
            self._protocol_errors += 1
            return got_any, self._fail(str(exc))
        except OSError as exc:
            if self._stop.is_set():
                return got_any, "stop requested"
            return got_any, self._fail(f"socket error: {exc}")

    def _fail(self, reason: str) -> str:
        logger.warning("closing connection to %s:%d: %s", self.host, self.port, reason)
        self._last_error = reason
        return reason

    def _handle(self, reader: MessageReader, header: Header) -> None:
        mtype = header.message_type
        raw_wanted = self._on_raw is not None
        if mtype == "IMAGE":
            filtered = bool(self._device_filter) and header.device != self._device_filter
            if filtered and not raw_wanted:
                reader.skip_body(header, self._verify_crc)
                self._filtered += 1
                return
            body = bytearray(header.body_size)  # owned by the Frame from now on
            reader.read_into(memoryview(body), header)
            wall, mono = stamp()
            if self._verify_crc:
                check_crc(header, body)
            self._deliver_raw(reader, body, wall, mono)
            if filtered:
                self._filtered += 1
                return
            try:
                frame = decode_image(
                    header, body, verify_crc=False, seq=self._seq, receive_wall_ns=wall, receive_ns=mono
                )
            except UnsupportedContentError as exc:
                self._skip_unsupported(header, exc)
                return
            except ProtocolError as exc:
                self._bad_content(header, exc)
                return
            self._seq += 1
            self._frames += 1
            try:
                self._on_frame(frame)
            except Exception:
                self._callback_errors += 1
                logger.exception("on_frame callback failed")
            return
        if not is_known_type(mtype) and not raw_wanted:
            reader.skip_body(header, self._verify_crc)
            self._unknown += 1
            return
        view = reader.read_body_reused(header)
        wall, mono = stamp()
        if self._verify_crc:
            check_crc(header, view)
        self._deliver_raw(reader, view, wall, mono)
        try:
            msg = decode_message(header, view, verify_crc=False, receive_wall_ns=wall, receive_ns=mono)
        except UnsupportedContentError as exc:
            self._skip_unsupported(header, exc)
            return
        except ProtocolError as exc:
            self._bad_content(header, exc)
            return
        if msg is None:
            self._unknown += 1
            return
        self._messages += 1
        if self._on_message is not None:
            try:
                self._on_message(msg)
            except Exception:
                self._callback_errors += 1
                logger.exception("on_message callback failed")

    def _deliver_raw(self, reader: MessageReader, body: BytesLike, wall: int, mono: int) -> None:
        if self._on_raw is None:
            return
        try:
            self._on_raw(RawMessage(reader.header_bytes, bytes(body), wall, mono))
        except Exception:
            self._callback_errors += 1
            logger.exception("on_raw callback failed")

    def _skip_unsupported(self, header: Header, exc: Exception) -> None:
        self._unknown += 1
        if self._unknown <= 3 or self._unknown % 1000 == 0:
            logger.info("skipping %s from %r: %s", header.message_type, header.device, exc)

    def _bad_content(self, header: Header, exc: Exception) -> None:
        # The message was framed correctly (and its CRC, if any, matched): the stream is still in sync,
        # so drop this one message and keep the connection.
        self._protocol_errors += 1
        self._last_error = f"malformed {header.message_type}: {exc}"
        if self._protocol_errors <= 3 or self._protocol_errors % 1000 == 0:
            logger.warning("dropping malformed %s from %r: %s", header.message_type, header.device, exc)
