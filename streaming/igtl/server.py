"""OpenIGTLink server: broadcast to many clients, each behind a bounded drop-oldest queue.

Threads (all named ``<name>-...``, default prefix ``guidance-igtl-server``):

* ``-accept``: waits in ``select`` on the listening socket and a wake-up socket pair (``stop`` wakes it).
* per client ``-tx-N``: writer; sleeps on a condition until its queue has data, then ``sendall``. A slow
  client only ever blocks its own writer; its queue (``send_queue`` messages, policy *drop oldest*)
  overflows and the drops are counted, the producer and other clients are never held up.
* per client ``-rx-N``: reader; decodes what the client sends (results, GET_/STATUS...) and reports it to
  ``on_message``. Framing errors (bad header, oversized, wrong CRC, stalled) close that client only.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streaming.igtl.codec import AnyMessage, Header, check_crc, decode_message, encode_image, is_known_type
from streaming.igtl.crc64 import BytesLike
from streaming.igtl.errors import CrcError, FramingError, ProtocolError
from streaming.igtl.wire import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    MessageReader,
    PeerClosed,
    stamp,
    tune_socket,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerClientStats:
    """One connected client's counters."""

    client_id: int
    peer: str
    queued: int
    sent: int
    dropped: int
    received: int


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Snapshot of the server's counters (totals include clients that have gone)."""

    clients: int
    accepted: int
    rejected: int
    sent: int
    dropped: int
    received: int
    crc_errors: int
    protocol_errors: int
    per_client: tuple[ServerClientStats, ...]


class _Client:
    """One accepted connection: a bounded queue + writer thread, and a reader thread."""

    def __init__(self, server: IGTLServer, sock: socket.socket, client_id: int, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.id = client_id
        self.peer = peer
        self.queue: collections.deque[BytesLike] = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.closed = False
        self.reason = ""
        self.sent = 0
        self.dropped = 0
        self.received = 0
        base = server.name
        self.tx = threading.Thread(target=self._write_loop, name=f"{base}-tx-{client_id}", daemon=True)
        self.rx = threading.Thread(target=self._read_loop, name=f"{base}-rx-{client_id}", daemon=True)

    def start(self) -> None:
        self.tx.start()
        self.rx.start()

    def enqueue(self, data: BytesLike) -> bool:
        with self.cond:
            if self.closed:
                return False
            if len(self.queue) >= self.server.send_queue:
                self.queue.popleft()  # drop oldest: the newest picture is the one worth sending
                self.dropped += 1
            self.queue.append(data)
            self.cond.notify()
        return True

    def close(self, reason: str) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.reason = reason
            self.queue.clear()
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv and a blocked sendall
        except OSError as exc:
            logger.debug("client %d shutdown: %s", self.id, exc)

    def _write_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    data = self.queue.popleft()
                self.sock.sendall(data)
                self.sent += 1
        except OSError as exc:
            self.close(f"send failed: {exc}")

    def _read_loop(self) -> None:
        server = self.server
        reason = "closed"
        try:
            reader = MessageReader(
                self.sock, max_body_bytes=server.max_body_bytes, stall_timeout_s=server.stall_timeout_s
            )
            while True:
                header = reader.read_header()
                if not is_known_type(header.message_type):
                    reader.skip_body(header, server.verify_crc)
                    continue
                # Own buffer per message: an IMAGE result's pixels are a view of it.
                body = bytearray(header.body_size)
                reader.read_into(memoryview(body), header)
                wall, mono = stamp()
                if server.verify_crc:
                    check_crc(header, body)
                self.received += 1
                server.deliver_(header, body, wall, mono)
        except PeerClosed:
            reason = "client closed the connection"
        except CrcError as exc:
            server.count_error_(crc=True)
            reason = str(exc)
        except FramingError as exc:
            server.count_error_(crc=False)
            reason = str(exc)
        except OSError as exc:
            reason = f"socket error: {exc}"
        finally:
            stopping = server.stopping_
            if not stopping and not self.closed:
                logger.info("client %d (%s) disconnected: %s", self.id, self.peer, reason)
            self.close(reason)
            self.tx.join(2.0)
            self.sock.close()
            server.remove_(self)


class IGTLServer:
    """Serve OpenIGTLink to several clients (our replay server, sending results back to 3D Slicer).

    Args:
        host: interface to bind (default loopback only).
        port: 0 picks a free port; read :attr:`port` after :meth:`start`.
        on_message: called (on a client's reader thread) with each decoded message a client sends.
        name: thread-name prefix (must start with ``guidance-``).
        max_clients: further connections are accepted and closed at once (logged).
        send_queue: per-client queue length; when full the oldest queued message is dropped.
        max_body_bytes, stall_timeout_s, verify_crc: receive-side limits, as in the client.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_message: Callable[[AnyMessage], None] | None = None,
        name: str = "guidance-igtl-server",
        max_clients: int = 16,
        send_queue: int = 4,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        verify_crc: bool = True,
    ) -> None:
        if send_queue < 1:
            raise ValueError("send_queue must be >= 1")
        self.host = host
        self._requested_port = port
        self.name = name
        self.max_clients = max_clients
        self.send_queue = send_queue
        self.max_body_bytes = max_body_bytes
        self.stall_timeout_s = stall_timeout_s
        self.verify_crc = verify_crc
        self._on_message = on_message
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Condition(threading.Lock())
        self._clients: dict[int, _Client] = {}
        self._next_id = 0
        self._port = 0
        self._accepted = 0
        self._rejected = 0
        self._dropped_gone = 0
        self._sent_gone = 0
        self._received_total = 0
        self._crc_errors = 0
        self._protocol_errors = 0

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind, listen and start accepting clients."""
        if self._accept_thread is not None:
            raise RuntimeError("IGTLServer already started")
        self._stopping.clear()
        listener = socket.create_server((self.host, self._requested_port), reuse_port=False, backlog=16)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._accept_thread.start()
        logger.info("OpenIGTLink server listening on %s:%d", self.host, self._port)

    def stop(self, timeout: float = 2.0) -> bool:
        """Close every client and the listening socket; True when all threads ended within ``timeout``."""
        if self._accept_thread is None:
            return True
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError as exc:
                logger.debug("wake-up send failed: %s", exc)
        self._accept_thread.join(timeout)
        ok = not self._accept_thread.is_alive()
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            c.close("server stopping")
        for c in clients:
            c.rx.join(timeout)
            ok = ok and not c.rx.is_alive() and not c.tx.is_alive()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        self._accept_thread = None
        if not ok:
            logger.error("%s threads did not stop within %.1f s", self.name, timeout)
        return ok

    def __enter__(self) -> IGTLServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (valid after :meth:`start`)."""
        return self._port

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def wait_for_clients(self, count: int = 1, timeout: float | None = None) -> bool:
        """Block until at least ``count`` clients are connected; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._clients) >= count, timeout)

    # ---------------------------------------------------------------------------------------- send

    def send(self, data: BytesLike) -> int:
        """Queue one encoded message for every client; returns how many clients it was queued for.

        Never blocks on the network. ``data`` is shared, not copied: do not modify it afterwards.
        """
        with self._lock:
            clients = list(self._clients.values())
        return sum(1 for c in clients if c.enqueue(data))

    def send_image(self, pixels: npt.NDArray[np.generic], device: str, **kwargs: Any) -> int:
        """Encode ``pixels`` with :func:`encode_image` (same keyword arguments) and :meth:`send` it."""
        return self.send(encode_image(pixels, device, **kwargs))

    @property
    def stats(self) -> ServerStats:
        with self._lock:
            clients = list(self._clients.values())
            per = tuple(
                ServerClientStats(c.id, c.peer, len(c.queue), c.sent, c.dropped, c.received) for c in clients
            )
            return ServerStats(
                clients=len(clients),
                accepted=self._accepted,
                rejected=self._rejected,
                sent=self._sent_gone + sum(c.sent for c in clients),
                dropped=self._dropped_gone + sum(c.dropped for c in clients),
                received=self._received_total,
                crc_errors=self._crc_errors,
                protocol_errors=self._protocol_errors,
                per_client=per,
            )

    # ------------------------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None
        assert wake is not None
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select([listener, wake], [], [])
            except OSError as exc:
                logger.error("accept loop failed: %s", exc)
                return
            if wake in readable or self._stopping.is_set():
                return
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                logger.warning("accept failed: %s", exc)
                continue
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            with self._lock:
                full = len(self._clients) >= self.max_clients
                if full:
                    self._rejected += 1
                else:
                    self._accepted += 1
                    client_id = self._next_id
                    self._next_id += 1
            if full:
                logger.warning("rejecting %s: already %d clients (max_clients)", peer, self.max_clients)
                sock.close()
                continue
            sock.setblocking(True)
            tune_socket(sock)
            client = _Client(self, sock, client_id, peer)
            with self._lock:
                self._clients[client_id] = client
                self._lock.notify_all()
            logger.info("client %d connected from %s", client_id, peer)
            client.start()

    # Trailing underscore: internal hooks for the per-client threads, not part of the public API.

    @property
    def stopping_(self) -> bool:
        return self._stopping.is_set()

    def remove_(self, client: _Client) -> None:
        with self._lock:
            if self._clients.pop(client.id, None) is not None:
                self._sent_gone += client.sent
                self._dropped_gone += client.dropped
            self._lock.notify_all()

    def count_error_(self, *, crc: bool) -> None:
        with self._lock:
            if crc:
                self._crc_errors += 1
            else:
                self._protocol_errors += 1

    def deliver_(self, header: Header, body: bytearray, wall: int, mono: int) -> None:
        with self._lock:
            self._received_total += 1
        try:
            msg = decode_message(header, body, verify_crc=False, receive_wall_ns=wall, receive_ns=mono)
        except ProtocolError as exc:
            with self._lock:
                self._protocol_errors += 1
            logger.warning("dropping malformed %s from a client: %s", header.message_type, exc)
            return
        if msg is None or self._on_message is None:
            return
        try:
            self._on_message(msg)
        except Exception:
            logger.exception("on_message callback failed")
