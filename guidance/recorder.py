"""The app-side recorder service: receiver thread -> bounded queue -> "guidance-recorder" thread -> file.

:meth:`Recorder.submit` is called from the OpenIGTLink receiver thread for every message and never blocks
it (one short lock, no I/O). The queue policy is named :data:`POLICY`: *lossless up to*
``max_backlog_mb`` of queued bytes, then *drop-newest* (the message being submitted is refused) with a
counter, so a slow disk never stalls the live picture and every loss is visible in :meth:`Recorder.stats`.

A write error (disk full...) stops writing (the file stays readable up to that point), is counted in
``errors`` and reported in ``stats().error`` and through ``on_error``; later submissions are counted as
dropped.

:func:`bench_record` measures the sustained recording rate over a real loopback OpenIGTLink stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.recording import RawMessageLike, RecordingError, RecordingWriter

logger = logging.getLogger(__name__)

__all__ = ["POLICY", "Recorder", "RecorderStats", "bench_record"]

POLICY = "lossless-then-drop-newest"


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """Counters of a :class:`Recorder` (a snapshot)."""

    written: int  # handed to the container: on disk within 0.5 s (a write error loses the open chunk)
    dropped: int  # messages/results refused (backlog full, or after a write error)
    bytes: int  # payload bytes written
    errors: int  # write errors (0 or 1: the recorder stops writing after the first)
    backlog_bytes: int  # queued, not yet written
    backlog_peak_bytes: int
    markers: int
    results: int
    error: str | None  # the write error's one-line reason
    policy: str = POLICY


@dataclass(frozen=True, slots=True)
class _Marker:
    label: str
    wall_ns: int


@dataclass(frozen=True, slots=True)
class _Result:
    seq: int
    receive_ns: int
    payload: bytes
    encoding: str


_Item = RawMessageLike | _Marker | _Result


class Recorder:
    """Record a live stream to a native recording on its own thread.

    Lifecycle: ``start()`` (creates the file; raises :class:`~streaming.recording.RecordingError` at once
    if it cannot) -> ``submit()`` ... -> ``stop()`` (drains the queue within ``stop_timeout_s``, then
    closes the file properly). Thread: ``guidance-recorder``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        max_backlog_mb: float = 256.0,
        compression: str = "none",
        chunk_size: int = 4 * 1024 * 1024,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._metadata = dict(metadata or {})
        self._max_backlog = int(max_backlog_mb * 1024 * 1024)
        self._compression = compression
        self._chunk_size = chunk_size
        self._on_error = on_error
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[_Item, int]] = deque()
        self._backlog = 0
        self._peak = 0
        self._written = 0
        self._dropped = 0
        self._bytes = 0
        self._markers = 0
        self._results = 0
        self._errors = 0
        self._error: str | None = None
        self._stopping = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self._writer: RecordingWriter | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Recorder already started")
        writer = RecordingWriter(
            self.path, self._metadata, compression=self._compression, chunk_size=self._chunk_size
        )
        writer.open()  # errors surface here, on the caller's thread
        self._writer = writer
        self._thread = threading.Thread(target=self._run, name="guidance-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> RecorderStats:
        """Write what is queued (up to ``timeout_s``; the rest is dropped and counted), close the file."""
        t = self._thread
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if t is not None:
            t.join(timeout_s)
            if t.is_alive():
                with self._cond:
                    self._abort = True
                    self._cond.notify_all()
                t.join(2.0)
                if t.is_alive():
                    logger.error("recorder thread did not stop (disk blocked?)")
        self._thread = None
        return self.stats()

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ producers (any thread)

    def submit(self, raw: RawMessageLike) -> bool:
        """Queue one received message; never blocks. False when it was dropped (and counted)."""
        return self._put(raw, len(raw.header) + len(raw.body))

    def submit_result(self, seq: int, receive_ns: int, payload: bytes, encoding: str) -> bool:
        """Queue a per-frame pipeline result (same backlog policy as messages)."""
        return self._put(_Result(seq, receive_ns, bytes(payload), encoding), len(payload))

    def add_marker(self, label: str, wall_ns: int | None = None) -> None:
        """Queue a marker stamped now (or at ``wall_ns``); tiny, never dropped while running."""
        self._put(_Marker(label, time.time_ns() if wall_ns is None else wall_ns), 0, force=True)

    def _put(self, item: _Item, size: int, *, force: bool = False) -> bool:
        with self._cond:
            if self._stopping or self._error is not None or self._thread is None:
                self._dropped += 1
                return False
            if not force and self._backlog + size > self._max_backlog:
                self._dropped += 1  # drop-newest: the message being submitted is refused
                return False
            self._queue.append((item, size))
            self._backlog += size
            self._peak = max(self._peak, self._backlog)
            self._cond.notify()
        return True

    def stats(self) -> RecorderStats:
        with self._cond:
            return RecorderStats(
                written=self._written,
                dropped=self._dropped,
                bytes=self._bytes,
                errors=self._errors,
                backlog_bytes=self._backlog,
                backlog_peak_bytes=self._peak,
                markers=self._markers,
                results=self._results,
                error=self._error,
            )

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        writer = self._writer
        assert writer is not None
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        # Blocking wait; the timeout only serves the time-based flush of pending data.
                        self._cond.wait(writer.next_flush_in_s)
                        if not self._queue:
                            break
                    if self._abort or (self._stopping and not self._queue):
                        self._dropped += sum(1 for it, _ in self._queue if not isinstance(it, _Marker))
                        self._queue.clear()
                        self._backlog = 0
                        break
                    item, size = self._queue.popleft() if self._queue else (None, 0)
                if item is None:
                    writer.maybe_flush()
                    continue
                self._write(writer, item)
                with self._cond:
                    self._backlog -= size
                if self._error is not None:
                    break
        finally:
            try:
                writer.close()
            except RecordingError as exc:
                self._fail(str(exc))
            with self._cond:
                if self._queue:
                    self._dropped += len(self._queue)
                    self._queue.clear()
                    self._backlog = 0

    def _write(self, writer: RecordingWriter, item: _Item) -> None:
        try:
            if isinstance(item, _Marker):
                writer.add_marker(item.label, item.wall_ns)
                self._markers += 1
            elif isinstance(item, _Result):
                writer.write_result(item.seq, item.receive_ns, item.payload, item.encoding)
                self._results += 1
            else:
                writer.write_message(item)
                with self._cond:
                    self._written += 1
                    self._bytes += len(item.header) + len(item.body)
        except RecordingError as exc:
            self._fail(str(exc))

    def _fail(self, reason: str) -> None:
        with self._cond:
            self._errors += 1
            self._error = reason
            self._dropped += len(self._queue)
            self._queue.clear()
            self._backlog = 0
        logger.error("recording stopped: %s", reason)
        if self._on_error is not None:
            self._on_error(reason)


# ---------------------------------------------------------------------------------------------- bench


def bench_record(
    width: int = 1024,
    height: int = 768,
    fps: float = 60.0,
    seconds: float = 5.0,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Sustained recording rate over a real loopback OpenIGTLink stream into a :class:`Recorder`.

    A paced sender thread streams ``width`` x ``height`` uint8 IMAGE messages at ``fps`` over TCP; a
    receiver thread reads them exactly as the client does and submits them to the recorder.

    Returns:
        ``fps_in`` (messages received per second), ``fps_written`` (written per second, measured until the
        recorder has drained), ``dropped``, ``mb_per_s`` written, ``backlog_peak_mb``, ``frames``.
    """
    import tempfile

    import numpy as np

    from streaming.igtl import IGTLClient, IGTLServer, encode_image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(height, width), dtype=np.uint8) for _ in range(8)]
    received = 0
    got_all = threading.Event()
    n_frames = max(1, round(fps * seconds))

    with tempfile.TemporaryDirectory(prefix="guidance-bench-rec-", dir=out_dir) as tmp:
        path = Path(tmp) / "bench.mcap"
        rec = Recorder(path, {"bench": "record"})

        def on_raw(raw: RawMessageLike) -> None:
            nonlocal received
            rec.submit(raw)
            received += 1
            if received >= n_frames:
                got_all.set()

        server = IGTLServer(name="guidance-bench-server", send_queue=64)
        server.start()
        client = IGTLClient(
            "127.0.0.1",
            server.port,
            on_frame=lambda f: None,
            on_raw=on_raw,
            reconnect=False,
            name="guidance-bench-client",
        )
        rec.start()
        t0 = t_in = time.perf_counter()
        try:
            client.start()
            if not server.wait_for_clients(1, timeout=10.0):
                raise RuntimeError("bench client did not connect")
            period = 1.0 / fps
            stop = threading.Event()
            t0 = time.perf_counter()
            for i in range(n_frames):
                delay = t0 + i * period - time.perf_counter()
                if delay > 0:
                    stop.wait(delay)  # paced sender (benchmark driver, not a hot path)
                server.send(encode_image(images[i % len(images)], "Image", timestamp_ns=time.time_ns()))
            got_all.wait(max(5.0, seconds))
            t_in = time.perf_counter() - t0
        finally:
            client.stop()
            server.stop()
            st = rec.stop(timeout_s=60.0)
        t_all = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
    return {
        "fps_in": received / t_in if t_in > 0 else 0.0,
        "fps_written": st.written / t_all if t_all > 0 else 0.0,
        "dropped": float(st.dropped),
        "frames": float(received),
        "written": float(st.written),
        "mb_per_s": size_mb / t_all if t_all > 0 else 0.0,
        "backlog_peak_mb": st.backlog_peak_bytes / 1e6,
        "errors": float(st.errors),
    }
