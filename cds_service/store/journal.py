"""The audit journal: each process appends its records to its own file, fsynced in groups, before a call answers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..audit import CallRecord
from ..ops.call_pool import blocking_io
from . import spill

log = logging.getLogger(__name__)

PATTERN = "audit-journal-*.jsonl"
# A new segment after this many records: a segment is deleted once the database holds all of its records, so
# this bounds what a crash leaves to replay and how long a file lives after its records are written.
SEGMENT_RECORDS = 2000
# Less room than this on the journal's disk is reported as full: a few hundred records' worth.
MIN_ROOM = 1 << 20


@dataclass(eq=False)
class Segment:
    """One journal file, open and locked (flock) for as long as its process may append to it or write its records."""

    path: Path
    fd: int
    offset: int = 0
    appended: int = 0
    settled: int = 0  # records written to the database (or refused by it): their line is no longer needed
    sealed: bool = False  # no more appends: deleted once every appended record is settled
    closed: bool = False
    broken: bool = False  # a failed write could not be cut back: the next line goes to a new segment


@dataclass
class JournalState:
    """What /health reports: the records journaled, and why appends fail (a full disk) when they do."""

    journaled: int = 0
    syncs: int = 0  # fdatasync calls: fewer than the records journaled when calls share them (group commit)
    failed_appends: int = 0
    failing_since: float | None = None
    last_error: str | None = None
    segments: set[Segment] = field(default_factory=set)


class Journal:
    """This process's append-only journal, one line per record (the spill file's format), with group fsync.

    append() returns once the line is on disk: the first waiting thread fsyncs for everyone who appended before it
    started (group commit), so concurrent calls share one fsync. A line's call id names its record: the writer
    settles it once the database has it, and a segment whose records are all settled is deleted. A process killed
    in between leaves its segments unlocked; any live process (or the next start) replays them into the database,
    idempotently on the call id.
    """

    def __init__(self, folder: Path, *, segment_records: int = SEGMENT_RECORDS) -> None:
        self.folder = folder
        self.segment_records = segment_records
        self.pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._current: Segment | None = None
        self._owner: dict[str, Segment] = {}
        self._seq = 0  # lines appended by this process
        self._synced = 0  # lines known to be on disk
        self._syncing = False
        self.state = JournalState()

    # -- appending ----------------------------------------------------------------------------------------------
    def append(self, call_id: str, record: CallRecord) -> bool:
        """Write the record's line and wait until it is on disk; False (logged) when it could not be written."""
        try:
            line = spill.encode(call_id, record)
        except (TypeError, ValueError) as exc:
            log.error("audit record %s for %s cannot be journaled: %s", call_id, record.service_id, exc)
            return False
        with self._cond:
            try:
                segment = self._segment()
                _write_all(segment, line)
            except OSError as exc:
                self._append_failed(exc)
                return False
            self._seq += 1
            mine = self._seq
            segment.appended += 1
            self._owner[call_id] = segment
            self.state.journaled += 1
            recovered = self.state.failing_since
            self.state.failing_since = None
            self.state.last_error = None
        # Waiting on the disk: a thread of the call pool steps aside meanwhile, so another can take the next call
        # (the wait is the device's flush, milliseconds; the CPU is free for other calls).
        with blocking_io(), self._cond:
            while self._synced < mine:
                if self._syncing:
                    self._cond.wait()
                    continue
                # Leader: one fdatasync covers every line appended so far. They all went to the current segment:
                # a rotation syncs the old one and counts its lines as synced, so a waiter whose line is in an
                # older segment never gets here.
                if self._current is None:  # only after a rotation, which synced every line so far
                    self._synced = self._seq
                    continue
                self._syncing = True
                target, fd = self._seq, self._current.fd
                self._cond.release()
                error: OSError | None = None
                try:
                    os.fdatasync(fd)
                    self.state.syncs += 1
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._synced = max(self._synced, target)
                    self._cond.notify_all()
                if error is not None:
                    # The line may not be on disk; the call still answers and its record stays queued for the
                    # database. Reported like a full disk.
                    self._append_failed(error)
                    return False
        if recovered is not None:
            log.warning("audit journal writable again after %.1f s", time.monotonic() - recovered)
        return True

    def _segment(self) -> Segment:
        """The segment to append to: opened on first use, rotated every segment_records lines."""
        while True:
            current = self._current
            if current is not None and current.appended < self.segment_records and not current.broken:
                return current
            if current is None or not self._syncing:
                break
            # A leader may be syncing the old file: let it finish before sealing it (and look again after: another
            # thread may have rotated meanwhile).
            self._cond.wait()
        if current is not None:
            os.fdatasync(current.fd)
            self.state.syncs += 1
            self._synced = self._seq
            current.sealed = True
            self._current = None
            self._drop_if_done(current)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"audit-journal-{socket.gethostname()}-{os.getpid()}-{stamp}-{secrets.token_hex(4)}.jsonl"
        path = self.folder / name
        # The audit log holds patient data: readable by the service's user only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Held until the process ends: a replay skips locked files, so a live process's journal is its own.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            spill.fsync_folder(self.folder)  # the file's name must survive a power cut as well as its lines
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        segment = Segment(path, fd)
        self._current = segment
        self.state.segments.add(segment)
        return segment

    def _append_failed(self, exc: OSError) -> None:
        state = self.state
        state.failed_appends += 1
        state.last_error = f"{type(exc).__name__}: {exc.strerror or exc}"
        first = state.failing_since is None
        if first:
            state.failing_since = time.monotonic()
        if first or state.failed_appends % 100 == 0:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            log.error(
                "audit journal %s: cannot append (%s%s); %d appends failed, calls answer with their records only "
                "queued in memory",
                self.folder,
                state.last_error,
                ", the disk is full" if full else "",
                state.failed_appends,
            )

    # -- settling -----------------------------------------------------------------------------------------------
    def settle(self, call_ids: list[str]) -> None:
        """The database holds these records (or refused them): a segment whose records are all settled goes."""
        with self._cond:
            for call_id in call_ids:
                segment = self._owner.pop(call_id, None)
                if segment is None:
                    continue
                segment.settled += 1
                self._drop_if_done(segment)

    def holds(self, call_id: str) -> bool:
        """Whether the record is in this process's journal and not yet settled."""
        with self._cond:
            return call_id in self._owner

    def _drop_if_done(self, segment: Segment) -> None:
        if segment.sealed and segment.settled >= segment.appended and not segment.closed:
            with contextlib.suppress(OSError):
                segment.path.unlink()  # a crash before this only means a replay that finds every id stored
            self._close(segment)

    def _close(self, segment: Segment) -> None:
        segment.closed = True
        self.state.segments.discard(segment)
        with contextlib.suppress(OSError):
            os.close(segment.fd)

    def close(self) -> list[Path]:
        """Stop appending (process exit): fully settled segments go, the others stay for a replay; their paths."""
        kept: list[Path] = []
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._current is not None:
                self._current.sealed = True
                self._current = None
            for segment in list(self.state.segments):
                self._drop_if_done(segment)
                if not segment.closed:
                    kept.append(segment.path)
                    self._close(segment)  # unlocks it: the next start (or a live worker) replays it
            self._owner.clear()
        return kept

    # -- health -------------------------------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why records cannot be journaled now (appends fail, or the disk has no room left), else None.

        The free-space check lets every worker report a full disk, not only the ones whose calls hit it."""
        if self.state.failing_since is not None:
            return f"audit journal failing: {self.state.last_error}"
        try:
            st = os.statvfs(self.folder)
        except OSError:
            return None  # no folder yet: the first append makes it (and reports its failure)
        free = st.f_bavail * st.f_frsize
        return None if free >= MIN_ROOM else f"audit journal: {free} bytes free on its disk"

    def recheck(self) -> None:
        """While appends fail, try a small fsynced write in the folder: success ends the failure (a disk that was
        full has room again) without waiting for a call, which /ready's 503 may be keeping away."""
        if self.state.failing_since is None:
            return
        probe = self.folder / f".audit-journal-probe-{os.getpid()}"
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(b"\n" * 65536)  # a few records' worth: room for more than one line
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        with self._cond:
            if self.state.failing_since is not None:
                log.warning(
                    "audit journal %s writable again after %.1f s",
                    self.folder,
                    time.monotonic() - self.state.failing_since,
                )
                self.state.failing_since = None
                self.state.last_error = None

    def describe(self) -> dict[str, object]:
        state = self.state
        return {
            "journaled": state.journaled,
            "fsyncs": state.syncs,
            **({"failedAppends": state.failed_appends} if state.failed_appends else {}),
            **({"error": state.last_error} if state.last_error else {}),
        }


def _write_all(segment: Segment, line: bytes) -> None:
    """Append the whole line or nothing: a short write (a full disk) is cut back, so the next line starts clean."""
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(segment.fd, view) :]
    except OSError:
        try:
            os.ftruncate(segment.fd, segment.offset)
            os.lseek(segment.fd, segment.offset, os.SEEK_SET)
        except OSError:
            segment.broken = True
        raise
    segment.offset += len(line)


def pending_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(PATTERN)) if folder.is_dir() else []
