"""The audit sink: hook threads queue records; one thread per process writes them in batches, off the hot path."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, String, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from ..audit import CallRecord
from ..ops import metrics
from . import journal as journal_module
from . import spill
from .db import Database, SchemaTooNew, StoreUnavailable, short_error
from .models import audit_call, audit_card

log = logging.getLogger(__name__)

_FLUSH = object()
_STOP = object()
# How often an idle writer looks for journals and spill files of processes that ended (a worker killed by
# SIGKILL leaves its journal): the first look is at the writer's start; while the database refuses them, less often.
_SCAN_INTERVAL = 2.0
_SCAN_BACKOFF_MAX = 8.0

Durability = Literal["sync", "async"]


def clean(value: Any, limit: int | None = None) -> Any:
    """Strings as PostgreSQL takes them: no NUL characters, cut to the column's length."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "")
    return value[:limit] if limit else value


def column_limit(table: Table, name: str) -> int | None:
    column_type = table.c[name].type
    return column_type.length if isinstance(column_type, String) else None


_CALL_LIMITS = {column.name: column_limit(audit_call, column.name) for column in audit_call.c}
_CARD_UUID_LIMIT = column_limit(audit_card, "card_uuid")
# Rows per INSERT: between two of them the writer lets go of the GIL, so a hook thread never waits long for it.
_CHUNK = 25


def insert_ignoring_duplicates(table: Table, backend: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: a row written twice (a retried batch, a resent item) is kept once."""
    dialect = postgresql if backend == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def call_rows(call_id: str, call: CallRecord) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The audit_call row and its audit_card rows for one record (fields named in CallRecord, nothing else)."""
    row: dict[str, Any] = {
        "call_id": call_id,
        "started_at": call.started_at,
        "service_id": call.service_id,
        "hook": call.hook,
        "hook_instance": call.hook_instance,
        "iss": call.iss,
        "tenant": call.tenant,
        "jti": call.jti,
        "user_id": call.user_id,
        "patient_id": call.patient_id,
        "status": call.status,
        "error": call.error,
        "duration_ms": float(call.duration_ms),
        **call.json_parts(),
        "coverage_assertions": call.coverage_assertions,
        "notes": call.notes,
    }
    for name, value in row.items():
        if isinstance(value, str):
            row[name] = clean(value, _CALL_LIMITS[name])
    cards = [
        {
            "card_uuid": clean(card.uuid, _CARD_UUID_LIMIT),
            "call_id": call_id,
            "service_id": row["service_id"],
            "started_at": call.started_at,
        }
        for card in call.cards
        if card.uuid
    ]
    return row, cards


def write_batch(conn: Connection, backend: str, batch: list[tuple[str, CallRecord]]) -> None:
    """Insert the records (idempotent on call_id and card uuid) in small INSERTs with a GIL release between them:
    converting rows is Python work, and a hook thread waiting for the GIL would otherwise wait up to the 5 ms
    switch interval."""
    insert_calls = insert_ignoring_duplicates(audit_call, backend)
    insert_cards = insert_ignoring_duplicates(audit_card, backend)
    for start in range(0, len(batch), _CHUNK):
        calls: list[dict[str, Any]] = []
        cards: list[dict[str, Any]] = []
        for call_id, call in batch[start : start + _CHUNK]:
            row, card_rows = call_rows(call_id, call)
            calls.append(row)
            cards.extend(card_rows)
        conn.execute(insert_calls, calls)
        if cards:
            conn.execute(insert_cards, cards)
        time.sleep(0)


@dataclass
class AuditStats:
    """Counters for /health: what this process queued, wrote, failed to write, spilled to a file and dropped."""

    queued: int = 0
    written: int = 0
    dropped: int = 0
    spilled: int = 0
    failed_writes: int = 0
    failing_since: float | None = None
    last_error: str | None = None

    @property
    def pending(self) -> int:
        return self.queued - self.written - self.dropped - self.spilled

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "written": self.written,
            "failedWrites": self.failed_writes,
            "dropped": self.dropped,
            **({"spilled": self.spilled} if self.spilled else {}),
            **({"lastError": self.last_error} if self.last_error else {}),
        }


@dataclass
class _ProcessState:
    """The queue and writer thread of one process: a forked worker builds its own on first use."""

    pid: int
    queue: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    done: threading.Condition = field(default_factory=threading.Condition)
    stats: AuditStats = field(default_factory=AuditStats)
    stop_at: float | None = None  # set by close(): give up retrying after this monotonic time
    stopping: threading.Event = field(default_factory=threading.Event)
    journal: journal_module.Journal | None = None  # sync durability: records are on disk before the call answers
    writing: list[tuple[str, CallRecord]] = field(default_factory=list)  # the batch the thread is writing now
    given_up: list[tuple[str, CallRecord]] = field(default_factory=list)  # batches not written by stop_at


class AuditWriter:
    """AuditSink that writes to the database. record() only queues (a few microseconds); it never raises."""

    def __init__(
        self,
        db: Database,
        ensure_schema: Any,
        *,
        spill_dir: Path | None = None,
        durability: Durability = "sync",
        batch_window: float = 0.2,
        max_batch: int = 500,
        max_pending: int = 100_000,
    ) -> None:
        self.db = db
        self._ensure_schema = ensure_schema
        # Where records still unwritten at close() go (None: they are lost, and logged).
        self.spill_dir = spill_dir
        # sync: each record is appended to this process's journal in spill_dir (fsynced) before record() returns;
        # async: records wait in memory only (a SIGKILL loses those not written yet). No folder, no journal.
        self.durability: Durability = durability
        self.batch_window = batch_window
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._state: _ProcessState | None = None

    # -- the hook side -------------------------------------------------------------------------------------------
    def record(self, call: CallRecord) -> None:
        try:
            state = self._process_state(start=True)
            call_id = str(uuid.uuid4())
            if state.journal is not None:
                # On disk before the call answers; should the queue below be full, the journal keeps it for the
                # replay after this process ends.
                state.journal.append(call_id, call)
            stats = state.stats
            with state.done:
                if stats.pending >= self.max_pending:
                    stats.dropped += 1
                    stats.queued += 1
                    dropped = stats.dropped
                else:
                    stats.queued += 1
                    dropped = 0
            if dropped:
                metrics.audit_queued()
                metrics.audit_failed(1)
                if dropped == 1 or dropped % 1000 == 0:
                    log.error("audit queue full (%d records waiting): %d records dropped", self.max_pending, dropped)
                return
            state.queue.put((call_id, call))
            metrics.audit_queued()
        except Exception:  # the hook must answer whatever happens to its audit record
            log.exception("could not queue an audit record")

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def _process_state(self, *, start: bool) -> _ProcessState:
        pid = os.getpid()
        state = self._state
        if state is None or state.pid != pid:
            with self._lock:
                state = self._state
                if state is None or state.pid != pid:
                    # A new process (first use, or a gunicorn worker after fork): the parent's queue, locks and
                    # thread do not carry over, so start afresh.
                    state = _ProcessState(pid=pid)
                    if self.durability == "sync" and self.spill_dir is not None:
                        state.journal = journal_module.Journal(self.spill_dir)
                    self._state = state
        if start and state.thread is None:
            with self._lock:
                if state.thread is None:
                    state.thread = threading.Thread(
                        target=self._run, args=(state,), name="cds-audit-writer", daemon=True
                    )
                    state.thread.start()
        return state

    def start(self) -> None:
        """Start this process's writer now (a gunicorn worker at its start): it replays what processes that ended
        left behind without waiting for a first call."""
        self._process_state(start=True)

    def stats(self) -> dict[str, Any]:
        state = self._process_state(start=False)
        with state.done:
            out = state.stats.as_dict()
        out["durability"] = self.durability if state.journal is not None else "async"
        if state.journal is not None:
            out["journal"] = state.journal.describe()
        return out

    def healthy(self) -> bool:
        return self._process_state(start=False).stats.failing_since is None

    def journal_problem(self) -> str | None:
        """Why records cannot be made durable before their call answers (a full disk), else None."""
        state = self._process_state(start=False)
        if state.journal is None:
            return None
        state.journal.recheck()
        return state.journal.problem()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is written (or dropped); False if time ran out."""
        state = self._process_state(start=False)
        if state.thread is None:
            return True
        with state.done:
            target = state.stats.queued
        state.queue.put(_FLUSH)
        deadline = time.monotonic() + timeout
        with state.done:
            while state.stats.queued - state.stats.pending < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not state.done.wait(remaining):
                    return state.stats.queued - state.stats.pending >= target
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, then stop the thread (gunicorn worker_exit, atexit). Idempotent.

        What the database has not taken after `timeout` seconds of retrying goes to a spill file (written back to
        the database on the next start). 10 s, not more: gunicorn kills a worker 20 s (graceful_timeout) after it
        was told to stop, and the worker first finishes its calls in flight.
        """
        state = self._state
        if state is None or state.pid != os.getpid() or state.thread is None:
            return
        state.stop_at = time.monotonic() + timeout
        state.stopping.set()
        state.queue.put(_STOP)
        state.thread.join(timeout + 1)
        with self._lock:
            if self._state is state:
                self._state = None  # a record after close() starts a new writer
        leftovers = self._leftovers(state)
        kept: list[Path] = []
        journaled: list[tuple[str, CallRecord]] = []
        if state.journal is not None:
            # Journaled records need no spill: their journal stays, unlocked, for the next replay.
            journaled = [entry for entry in leftovers if state.journal.holds(entry[0])]
            leftovers = [entry for entry in leftovers if not state.journal.holds(entry[0])]
            kept = state.journal.close()
            with state.done:
                state.stats.spilled += len(journaled)
            if journaled:
                metrics.audit_spilled(len(journaled))
        spilled_to = self._spill(state, leftovers) if leftovers else None
        with state.done:
            lost = state.stats.pending
        if kept:
            log.warning(
                "audit: %d answered calls could not be written before exit (%s); they stay in the journal %s, "
                "written to the database on the next start",
                len(journaled),
                state.stats.last_error,
                ", ".join(path.name for path in kept),
            )
        if lost:
            metrics.audit_failed(lost)
            log.error("audit: %d answered calls could not be written before exit (%s)", lost, state.stats.last_error)
        elif spilled_to:
            log.warning(
                "audit: %d answered calls could not be written before exit (%s); spilled to %s, written to the "
                "database on the next start",
                len(leftovers),
                state.stats.last_error,
                spilled_to,
            )
        elif not kept:
            log.info("audit: all %d records of this process written", state.stats.written)

    def _leftovers(self, state: _ProcessState) -> list[tuple[str, CallRecord]]:
        """Every record not written: batches given up, the batch a stuck thread is still writing, the queue."""
        with state.done:
            entries = list(state.given_up)
            state.given_up.clear()
            if state.thread is not None and state.thread.is_alive():
                # Stuck in a database call past its deadline: spill its batch too. Should that write still succeed,
                # the replay finds the call ids already stored and skips them.
                entries.extend(state.writing)
        entries.extend(_drain(state.queue))
        state.queue.put(_STOP)  # a thread that comes back from a stuck write finds it and ends
        return entries

    def _spill(self, state: _ProcessState, entries: list[tuple[str, CallRecord]]) -> Path | None:
        if self.spill_dir is None:
            return None
        try:
            path, count = spill.spill(self.spill_dir, entries)
        except OSError as exc:
            log.error("audit: could not spill %d records to %s: %s", len(entries), self.spill_dir, exc)
            return None
        with state.done:
            state.stats.spilled += count
        metrics.audit_spilled(count)
        return path

    # -- the writer thread ---------------------------------------------------------------------------------------
    def _run(self, state: _ProcessState) -> None:
        stop = False
        next_scan, scan_wait = time.monotonic(), _SCAN_INTERVAL
        while not stop:
            batch: list[tuple[str, CallRecord]] = []
            if time.monotonic() >= next_scan and not state.stopping.is_set():
                scan_wait = _SCAN_INTERVAL if self._replay_ended() else min(scan_wait * 2, _SCAN_BACKOFF_MAX)
                next_scan = time.monotonic() + scan_wait
            try:
                item = state.queue.get(timeout=max(0.0, next_scan - time.monotonic()))
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.batch_window
            while True:
                if item is _STOP:
                    stop = True
                elif item is not _FLUSH:
                    batch.append(item)
                if stop or item is _FLUSH or len(batch) >= self.max_batch:
                    break
                remaining = deadline - time.monotonic()
                try:
                    item = state.queue.get(timeout=remaining) if remaining > 0 else state.queue.get_nowait()
                except queue.Empty:
                    break
            if stop:  # take whatever else is queued: it was answered and must be written too
                batch.extend(_drain(state.queue))
            for start in range(0, len(batch), self.max_batch):
                part = batch[start : start + self.max_batch]
                with state.done:
                    state.writing = part
                settled = True
                try:
                    if not self._write_with_retry(state, part):
                        settled = False
                        with state.done:
                            state.given_up.extend(part)  # close() spills them (or leaves them in the journal)
                except Exception:  # never let the writer thread die: later records still need writing
                    log.exception("audit writer failed on a batch of %d records", len(batch))
                    with state.done:
                        state.stats.dropped += len(part)
                    metrics.audit_failed(len(part))
                finally:
                    if settled and state.journal is not None:
                        # Stored (or refused, which a replay would repeat): their journal lines are done.
                        state.journal.settle([call_id for call_id, _ in part])
                    with state.done:
                        state.writing = []
            with state.done:
                state.done.notify_all()

    def _replay_ended(self) -> bool:
        """Write the journals and spill files that processes which ended left in the folder; False when the
        database refused them (they stay for the next look)."""
        if self.spill_dir is None:
            return True
        patterns = (journal_module.PATTERN, spill.PATTERN)
        if not any(journal_module.pending_files(self.spill_dir)) and not spill.pending_files(self.spill_dir):
            return True
        try:
            result = spill.replay(
                self.db,
                self.spill_dir,
                lambda conn, entries: write_batch(conn, self.db.backend, entries),
                self._ensure_schema,
                patterns,
                quiet=True,
            )
        except Exception:  # a folder it cannot read: log it, keep writing this process's records
            log.exception("audit: replaying %s failed", self.spill_dir)
            return False
        if result.inserted:
            metrics.audit_written(result.inserted, from_spill=True)
        return result.failed_files == 0

    def _write_with_retry(self, state: _ProcessState, batch: list[tuple[str, CallRecord]]) -> bool:
        """Write the batch, retrying while the database is unreachable; False when close()'s deadline passed first."""
        if not batch:
            return True
        delay = 0.25
        while True:
            try:
                self._write(batch)
            except (StoreUnavailable, SchemaTooNew, DBAPIError) as exc:
                if isinstance(exc, DBAPIError) and not exc.connection_invalidated and not _is_connectivity(exc):
                    self._write_one_by_one(state, batch)
                    return True
                self._failed(state, exc, len(batch))
                if state.stop_at is not None and time.monotonic() >= state.stop_at:
                    return False
                if state.stop_at is None:
                    state.stopping.wait(delay)  # close() wakes it: from then on its deadline bounds the retries
                else:
                    time.sleep(min(delay, 0.5, max(0.0, state.stop_at - time.monotonic())))
                delay = min(delay * 2, 5.0)
                continue
            except Exception as exc:  # a record the database or the JSON encoder refuses: isolate it
                self._failed(state, exc, len(batch))
                self._write_one_by_one(state, batch)
                return True
            self._written(state, len(batch))
            return True

    def _write_one_by_one(self, state: _ProcessState, batch: list[tuple[str, CallRecord]]) -> None:
        """A batch the database refuses (not a connection problem): keep every record it accepts, drop the rest."""
        for entry in batch:
            try:
                self._write([entry])
            except Exception as exc:
                log.error("audit record %s for %s refused: %s", entry[0], entry[1].service_id, short_error(exc))
                with state.done:
                    state.stats.dropped += 1
                metrics.audit_failed(1)
            else:
                self._written(state, 1)

    def _write(self, batch: list[tuple[str, CallRecord]]) -> None:
        """One transaction for the batch."""
        self._ensure_schema()
        with self.db.engine.begin() as conn:
            write_batch(conn, self.db.backend, batch)

    def _written(self, state: _ProcessState, count: int) -> None:
        metrics.audit_written(count)
        with state.done:
            stats = state.stats
            stats.written += count
            if stats.failing_since is not None:
                log.warning(
                    "audit store reachable again after %.1f s; %d records waiting",
                    time.monotonic() - stats.failing_since,
                    stats.pending,
                )
            stats.failing_since = None
            stats.last_error = None

    def _failed(self, state: _ProcessState, exc: BaseException, count: int) -> None:
        with state.done:
            stats = state.stats
            stats.failed_writes += 1
            stats.last_error = short_error(exc) if not isinstance(exc, StoreUnavailable | SchemaTooNew) else str(exc)
            first = stats.failing_since is None
            if first:
                stats.failing_since = time.monotonic()
            pending = stats.pending
            failures = stats.failed_writes
        # Log the first failure of a streak and then every 20th, not every retry.
        if first or failures % 20 == 0:
            log.error(
                "audit write failed (%d records waiting, %d failed writes): %s", pending, failures, stats.last_error
            )


def _drain(q: queue.SimpleQueue[Any]) -> list[tuple[str, CallRecord]]:
    """Every record queued now, without waiting; stop and flush markers are dropped."""
    out: list[tuple[str, CallRecord]] = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return out
        if item is not _STOP and item is not _FLUSH:
            out.append(item)


def _is_connectivity(exc: DBAPIError) -> bool:
    """OperationalError covers lost connections, a locked SQLite file and a missing table alike: retry them all."""
    return isinstance(exc, OperationalError | InterfaceError)
