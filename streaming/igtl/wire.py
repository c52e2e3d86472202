"""Socket plumbing shared by the client and the server: exact-length reads into reusable buffers.

A :class:`MessageReader` owns one connected, blocking socket (with a timeout = the stall timeout). It
reads the 58-byte header into one reused buffer, then the body either

* into a buffer the caller provides (the client gives each IMAGE body a fresh ``bytearray`` so that
  the Frame's pixels, a view of it, stay valid after the next message: one allocation, zero copies),
* into a reusable, grow-only buffer (small bodies decoded into new Python objects right away), or
* through a fixed 64 KiB scratch buffer when skipped (unknown types, filtered devices: bounded memory,
  CRC still checked incrementally).

Idle connections are fine (a header wait that times out with no byte read just waits again; that is
one wake-up per stall timeout, not a spin). A peer that goes quiet *inside* a message for longer than
the stall timeout raises :class:`StalledPeerError`.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from streaming.igtl.codec import HEADER_SIZE, Header, unpack_header
from streaming.igtl.crc64 import crc64
from streaming.igtl.errors import CrcError, FramingError, StalledPeerError

logger = logging.getLogger(__name__)

SCRATCH_SIZE = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_STALL_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message exactly as received, with our receive stamps (for the recorder)."""

    header: bytes
    body: bytes
    receive_wall_ns: int
    receive_ns: int


def tune_socket(sock: socket.socket) -> None:
    """Low-latency TCP options: no Nagle delay, keep-alive to notice a peer that vanished."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:  # not fatal: e.g. a socket type without these options
        logger.debug("could not set TCP options: %s", exc)


class PeerClosed(Exception):  # a normal end of stream, not an error
    """The peer closed the connection at a message boundary."""


class MessageReader:
    """Reads whole OpenIGTLink messages from one blocking socket (used by one thread only)."""

    __slots__ = ("_body", "_header", "_header_view", "_max_body", "_scratch", "_sock")

    def __init__(self, sock: socket.socket, *, max_body_bytes: int, stall_timeout_s: float) -> None:
        sock.settimeout(stall_timeout_s)
        self._sock = sock
        self._max_body = max_body_bytes
        self._header = bytearray(HEADER_SIZE)
        self._header_view = memoryview(self._header)
        self._body = bytearray(4096)
        self._scratch = bytearray(SCRATCH_SIZE)

    @property
    def header_bytes(self) -> bytes:
        """A copy of the last header read (for :class:`RawMessage`)."""
        return bytes(self._header)

    def read_header(self) -> Header:
        """Block until a whole header arrives and return it validated.

        Raises:
            PeerClosed: the peer closed the connection cleanly before a new message.
            StalledPeerError: part of a header arrived, then nothing for the stall timeout.
            FramingError: the header is invalid or the body is larger than ``max_body_bytes``.
            OSError: the socket failed (reset, shut down by :meth:`stop`).
        """
        view = self._header_view
        got = 0
        while got < HEADER_SIZE:
            try:
                n = self._sock.recv_into(view[got:], HEADER_SIZE - got)
            except TimeoutError:
                if got == 0:
                    continue  # idle between messages: legal, keep waiting (one wake-up per timeout)
                raise StalledPeerError(f"peer stalled after {got} of {HEADER_SIZE} header bytes") from None
            if n == 0:
                if got == 0:
                    raise PeerClosed("peer closed the connection")
                raise FramingError(f"peer closed the connection mid-header ({got} of {HEADER_SIZE} bytes)")
            got += n
        return unpack_header(self._header, self._max_body)

    def read_into(self, view: memoryview, header: Header) -> None:
        """Fill ``view`` exactly (the body of ``header``)."""
        sock = self._sock
        size = len(view)
        got = 0
        while got < size:
            try:
                n = sock.recv_into(view[got:], size - got)
            except TimeoutError:
                raise StalledPeerError(
                    f"peer stalled after {got} of {size} body bytes of {header.message_type}"
                ) from None
            if n == 0:
                raise FramingError(
                    f"peer closed the connection mid-body ({got} of {size} bytes of {header.message_type})"
                )
            got += n

    def read_body_reused(self, header: Header) -> memoryview:
        """Read the body into the reusable buffer; the view is valid until the next read."""
        size = header.body_size
        if len(self._body) < size:
            self._body = bytearray(max(size, 2 * len(self._body)))
        view = memoryview(self._body)[:size]
        self.read_into(view, header)
        return view

    def skip_body(self, header: Header, verify_crc: bool) -> None:
        """Consume the body through the fixed scratch buffer, checking the CRC incrementally."""
        remaining = header.body_size
        scratch = memoryview(self._scratch)
        crc = 0
        check = verify_crc and header.crc != 0
        while remaining:
            chunk = scratch[: min(remaining, SCRATCH_SIZE)]
            self.read_into(chunk, header)
            if check:
                crc = crc64(chunk, crc)
            remaining -= len(chunk)
        if check and crc != header.crc:
            raise CrcError(f"CRC mismatch on skipped {header.message_type} from {header.device!r}")


def stamp() -> tuple[int, int]:
    """``(time.time_ns(), time.perf_counter_ns())`` now."""
    return time.time_ns(), time.perf_counter_ns()
