"""Store-and-forward spool: DICOM files on disk + a persistent job table (SQLite, WAL), and a sender.

Guarantees:
- An object enters the spool only as a complete file (written atomically by the writers, then moved in
  with ``os.replace``) and its job row is committed before anything else happens to it. A file found in the
  spool without a row after a crash is adopted at the next :meth:`Spool.open`.
- A file is deleted only after the PACS acknowledged it (success or warning) and the job is marked done.
- UIDs are fixed when the object is written; a retry sends the same file, never re-UIDs.
- ``quota_bytes`` bounds the bytes held (pending + parked); an object that does not fit is refused with
  :class:`SpoolFullError` and nothing already spooled is touched. A real ENOSPC is reported the same way.
- Transient failures (PACS down, killed, busy) retry with exponential backoff and jitter; permanent ones
  (object refused) park the job and tell the user. Jobs left "sending" by a crash are resumed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from guidance.dicom.network import DicomNetworkError, DicomNode, StoreOutcome, StoreSession
from guidance.dicom.transcode import TRANSFER_SYNTAX_NAMES

logger = logging.getLogger(__name__)

PENDING, SENDING, DONE, PARKED = "pending", "sending", "done", "parked"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt);
"""


class SpoolFullError(OSError):
    """The spool quota (or the disk) has no room for an object; nothing already spooled was lost."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int
    state: str
    attempts: int
    next_attempt: float  # time.time() seconds
    last_error: str


@dataclass(frozen=True, slots=True)
class SendEvent:
    """Progress for the UI / CLI. ``kind``: sending | stored | retry | parked | unreachable."""

    kind: str
    job: Job | None
    message: str
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass(frozen=True, slots=True)
class SendReport:
    stored: int
    retry: int
    parked: int
    error: str  # association-level reason when the PACS could not be used, else ""


EventSink = Callable[[SendEvent], None]


class Spool:
    """A spool directory: ``objects/`` (queued files), ``incoming/`` (writers' output), ``jobs.sqlite``.

    Thread-safe: one connection guarded by a lock (the sender thread and the producer share it).
    Lifecycle: ``open()`` ... ``close()`` (or a ``with`` block).
    """

    def __init__(self, root: Path, quota_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.objects = self.root / "objects"
        self.incoming = self.root / "incoming"
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> Spool:
        self.objects.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db
        self._recover()
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Spool:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("spool is not open")
        return self._db

    def _recover(self) -> None:
        """After a crash: resume 'sending' jobs, finish deletions, drop temp files, adopt orphans."""
        now = time.time()
        with self._lock:
            db = self._conn()
            n = db.execute(
                "UPDATE jobs SET state=?, updated=? WHERE state=?", (PENDING, now, SENDING)
            ).rowcount
            if n:
                logger.warning("Spool: resuming %d job(s) interrupted while sending", n)
            for (file,) in db.execute("SELECT file FROM jobs WHERE state=?", (DONE,)).fetchall():
                (self.objects / file).unlink(missing_ok=True)
            known = {f for (f,) in db.execute("SELECT file FROM jobs WHERE state!=?", (DONE,))}
        for p in [*self.objects.iterdir(), *self.incoming.rglob("*")]:
            if p.is_file() and p.name.startswith("."):  # a writer's unfinished temp file, never an object
                p.unlink(missing_ok=True)
        for p in sorted(self.objects.iterdir()):
            if p.name not in known:
                self._adopt(p)
        for p in sorted(self.incoming.rglob("*")):
            if p.is_file():
                self._adopt(p)
        for d in sorted((d for d in self.incoming.rglob("*") if d.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()

    def _adopt(self, path: Path) -> None:
        try:
            self.enqueue(path, check_quota=False)
            logger.warning("Spool: adopted an object left without a job by an earlier crash")
        except (InvalidDicomError, AttributeError, OSError) as exc:
            bad = self.root / "unreadable"
            bad.mkdir(exist_ok=True)
            os.replace(path, bad / path.name)
            logger.error("Spool: moved an unreadable file aside (%s)", exc)

    # ------------------------------------------------------------------ producing
    def used_bytes(self) -> int:
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT COALESCE(SUM(size), 0) FROM jobs WHERE state!=?", (DONE,))
                .fetchone()
            )
        return int(row[0])

    def check_room(self, nbytes: int) -> None:
        """Raise SpoolFullError when ``nbytes`` more would exceed the quota or the free disk space."""
        used = self.used_bytes()
        if self.quota_bytes is not None and used + nbytes > self.quota_bytes:
            raise SpoolFullError(
                errno.ENOSPC,
                f"archive spool is full: {nbytes / 1e6:.1f} MB needed, "
                f"{max(self.quota_bytes - used, 0) / 1e6:.1f} MB free "
                f"of a {self.quota_bytes / 1e6:.1f} MB quota;"
                " nothing already spooled was lost - free space or let pending objects reach the PACS, then"
                " archive again",
            )
        free = shutil.disk_usage(self.root).free
        if nbytes + 64_000_000 > free:
            raise SpoolFullError(
                errno.ENOSPC,
                f"disk holding the archive spool has {free / 1e6:.0f} MB free, {nbytes / 1e6:.0f} MB needed",
            )

    def enqueue(self, path: Path, *, check_quota: bool = True) -> Job:
        """Move a complete DICOM file into the spool and commit its job. Idempotent per SOP Instance UID."""
        meta = read_file_meta_info(path)
        uid = str(meta.MediaStorageSOPInstanceUID)
        sop_class = str(meta.MediaStorageSOPClassUID)
        size = path.stat().st_size
        existing = self.job(uid)
        if existing is not None:
            if path.resolve() != existing.path.resolve():
                path.unlink(missing_ok=True)  # the same object again: the spooled copy stands
            return existing
        if check_quota and self.quota_bytes is not None:
            try:
                self.check_room(size)
            except SpoolFullError:
                path.unlink(missing_ok=True)  # only the new object is dropped; the caller is told
                raise
        name = f"{uid}.dcm"
        target = self.objects / name
        if path.resolve() != target.resolve():
            os.replace(path, target)
        now = time.time()
        with self._lock:
            self._conn().execute(
                "INSERT INTO jobs (sop_instance_uid, sop_class_uid, file, size, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (uid, sop_class, name, size, PENDING, now, now),
            )
        return self.job_or_raise(uid)

    # ------------------------------------------------------------------ queries
    def _row_to_job(self, row: tuple[Any, ...]) -> Job:
        jid, uid, cls, file, size, state, attempts, nxt, err = row
        return Job(
            int(jid),
            str(uid),
            str(cls),
            self.objects / str(file),
            int(size),
            str(state),
            int(attempts),
            float(nxt),
            str(err),
        )

    _COLS = "id, sop_instance_uid, sop_class_uid, file, size, state, attempts, next_attempt, last_error"

    def job(self, sop_instance_uid: str) -> Job | None:
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {self._COLS} FROM jobs WHERE sop_instance_uid=?", (sop_instance_uid,))
                .fetchone()
            )
        return None if row is None else self._row_to_job(row)

    def job_or_raise(self, sop_instance_uid: str) -> Job:
        j = self.job(sop_instance_uid)
        if j is None:
            raise KeyError(sop_instance_uid)
        return j

    def jobs(self, state: str | None = None) -> list[Job]:
        with self._lock:
            if state is None:
                rows = self._conn().execute(f"SELECT {self._COLS} FROM jobs ORDER BY id").fetchall()
            else:
                rows = (
                    self._conn()
                    .execute(f"SELECT {self._COLS} FROM jobs WHERE state=? ORDER BY id", (state,))
                    .fetchall()
                )
        return [self._row_to_job(r) for r in rows]

    def due(self, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    f"SELECT {self._COLS} FROM jobs WHERE state=? AND next_attempt<=? ORDER BY id",
                    (PENDING, now),
                )
                .fetchall()
            )
        return [self._row_to_job(r) for r in rows]

    def next_due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next pending job is due (0 if one is due now); None when nothing is pending."""
        now = time.time() if now is None else now
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT MIN(next_attempt) FROM jobs WHERE state=?", (PENDING,))
                .fetchone()
            )
        return None if row[0] is None else max(0.0, float(row[0]) - now)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {str(s): int(n) for s, n in rows}

    # ------------------------------------------------------------------ state changes
    def _set(
        self, job: Job, state: str, *, attempts: int | None = None, next_attempt: float = 0.0, error: str = ""
    ) -> None:
        with self._lock:
            self._conn().execute(
                "UPDATE jobs SET state=?, attempts=?, next_attempt=?, last_error=?, updated=? WHERE id=?",
                (
                    state,
                    job.attempts if attempts is None else attempts,
                    next_attempt,
                    error,
                    time.time(),
                    job.id,
                ),
            )

    def mark_sending(self, job: Job) -> None:
        self._set(job, SENDING)

    def mark_done(self, job: Job) -> None:
        """Commit success, then delete the local copy (a crash in between is finished by _recover)."""
        self._set(job, DONE)
        job.path.unlink(missing_ok=True)
        for copy in job.path.parent.glob(f".{job.path.name}.*"):  # transcoded copies kept for a retry
            copy.unlink(missing_ok=True)

    def mark_retry(self, job: Job, error: str, delay_s: float) -> None:
        self._set(job, PENDING, attempts=job.attempts + 1, next_attempt=time.time() + delay_s, error=error)

    def mark_parked(self, job: Job, error: str) -> None:
        self._set(job, PARKED, attempts=job.attempts + 1, error=error)

    def unpark(self, sop_instance_uids: Iterable[str] | None = None) -> int:
        """Give parked jobs another go (after the user fixed the cause). Returns how many."""
        with self._lock:
            if sop_instance_uids is None:
                cur = self._conn().execute(
                    "UPDATE jobs SET state=?, next_attempt=0, attempts=0 WHERE state=?", (PENDING, PARKED)
                )
                return int(cur.rowcount)
            n = 0
            for uid in sop_instance_uids:
                n += (
                    self._conn()
                    .execute(
                        "UPDATE jobs SET state=?, next_attempt=0, attempts=0"
                        " WHERE state=? AND sop_instance_uid=?",
                        (PENDING, PARKED, uid),
                    )
                    .rowcount
                )
            return n

    def retry_now(self) -> None:
        """Make every pending job due now (e.g. the user pressed "retry")."""
        with self._lock:
            self._conn().execute("UPDATE jobs SET next_attempt=0 WHERE state=?", (PENDING,))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay = min(max, initial * 2**(attempts)) * uniform(0.5, 1)."""

    initial_s: float = 2.0
    max_s: float = 300.0
    max_attempts: int = 50  # transient failures of one object before it is parked

    def delay(self, attempts: int) -> float:
        base = min(self.max_s, self.initial_s * (2.0 ** min(attempts, 30)))
        return base * random.uniform(0.5, 1.0)


class Archiver:
    """Sends due spool jobs to one PACS node. ``send_due()`` runs one pass on the calling thread;
    ``start()``/``stop()`` run passes on a background thread ("guidance-dicom-sender") that sleeps on an
    event until the next job is due or :meth:`wake` is called.
    """

    def __init__(
        self,
        spool: Spool,
        node: DicomNode,
        *,
        policy: RetryPolicy = RetryPolicy(),
        on_event: EventSink | None = None,
    ) -> None:
        self.spool = spool
        self.node = node
        self.policy = policy
        self._on_event = on_event
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: StoreSession | None = None
        self.last_error = ""

    def _emit(self, kind: str, job: Job | None, message: str) -> None:
        if self._on_event is not None:
            self._on_event(SendEvent(kind, job, message))

    # ------------------------------------------------------------------ one pass
    def send_due(self) -> SendReport:
        """Send every due job over one association. Never raises for PACS/network trouble."""
        due = self.spool.due()
        stored = retry = parked = 0
        if not due:
            return SendReport(0, 0, 0, "")
        try:
            session = StoreSession(self.node, {j.sop_class_uid for j in due})
            session.open()
        except DicomNetworkError as exc:
            self.last_error = exc.reason
            self._emit("unreachable", None, exc.reason)
            for job in due:
                self._fail(job, exc.reason, transient=True)
            return SendReport(0, len(due), 0, exc.reason)
        self._session = session
        error = ""
        try:
            for i, job in enumerate(due):
                if self._stopping.is_set():
                    break
                self.spool.mark_sending(job)
                self._emit("sending", job, f"sending {i + 1}/{len(due)}")
                if not job.path.exists():
                    self.spool.mark_parked(job, "the spooled file is missing")
                    self._emit("parked", job, "the spooled file is missing")
                    parked += 1
                    continue
                try:
                    outcome: StoreOutcome = session.store(job.path, message_id=(i % 65535) + 1)
                except DicomNetworkError as exc:
                    error = exc.reason
                    # this job and every later one go back to pending with backoff
                    for later in due[i:]:
                        self._fail(later, exc.reason, transient=True)
                    retry += len(due) - i
                    break
                if outcome.stored:
                    self.spool.mark_done(job)
                    stored += 1
                    ts = TRANSFER_SYNTAX_NAMES.get(outcome.transfer_syntax, outcome.transfer_syntax)
                    self._emit("stored", job, f"{outcome.message} ({ts})" if ts else outcome.message)
                elif outcome.category == "transient":
                    self._fail(job, outcome.message, transient=True)
                    retry += 1
                else:
                    self._fail(job, outcome.message, transient=False)
                    parked += 1
            if self._stopping.is_set():
                for job in self.spool.jobs(SENDING):
                    self.spool._set(job, PENDING)  # noqa: SLF001 - our own class
        finally:
            self._session = None
            session.close()
        self.last_error = error
        return SendReport(stored, retry, parked, error)

    def _fail(self, job: Job, reason: str, *, transient: bool) -> None:
        if transient and job.attempts + 1 < self.policy.max_attempts:
            delay = self.policy.delay(job.attempts)
            self.spool.mark_retry(job, reason, delay)
            self._emit("retry", job, f"{reason}; retry in {delay:.0f} s")
        else:
            self.spool.mark_parked(job, reason)
            logger.error("Archive: object parked: %s", reason)
            self._emit("parked", job, reason)

    def drain(self, timeout_s: float) -> bool:
        """Send until nothing is pending or ``timeout_s`` passed (waiting on backoff). True when empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.send_due()
            wait = self.spool.next_due_in()
            if wait is None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return False
            self._wake.wait(min(wait, remaining))
            self._wake.clear()

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("archiver already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="guidance-dicom-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop within ``timeout_s``: aborts a transfer in progress (it will be resent later)."""
        self._stopping.set()
        self._wake.set()
        session = self._session
        if session is not None:
            session.abort()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("Archive sender did not stop within %.1f s", timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.send_due()
            except (sqlite3.Error, OSError) as exc:
                logger.exception("Archive sender pass failed")
                self.last_error = f"archive sender: {exc}"
                self._emit("unreachable", None, self.last_error)
            wait = self.spool.next_due_in()
            self._wake.wait(3600.0 if wait is None else max(wait, 0.05))
            self._wake.clear()
