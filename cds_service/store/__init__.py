"""The service's database: audit log, feedback, JWT ids seen; one Store per app, safe across gunicorn's fork."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ..audit import AuditSink, Identity, NullAudit
from ..config import Settings
from ..ops import metrics
from . import journal, spill
from .audit_writer import AuditWriter, Durability, write_batch
from .card_ids import CardIds
from .db import Database, SchemaTooNew, StoreUnavailable, database_url, safe_url
from .feedback_store import FeedbackItem, SaveResult, save_feedback
from .jti import DatabaseJtiStore
from .schema import check_not_newer, current_revision, head_revision, known_revisions, upgrade

__all__ = ["SchemaTooNew", "Store", "StoreUnavailable", "open_store"]

log = logging.getLogger(__name__)

_HEALTH_TTL = 5.0
_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()


class Store:
    """Everything the app keeps in the database. Nothing connects until first use, in the process that uses it."""

    def __init__(
        self,
        db: Database,
        *,
        audit: bool = True,
        spill_dir: Path | None = None,
        card_id_key: str | None = None,
        durability: Durability = "sync",
    ) -> None:
        self.db = db
        # Audit records the database could not take before a process exited, and (sync durability) each process's
        # journal of records not yet in the database (None: neither is kept).
        self.spill_dir = spill_dir
        self.writer = AuditWriter(db, self.ensure_schema, spill_dir=spill_dir, durability=durability)
        self.audit: AuditSink = self.writer if audit else NullAudit()
        self.jti_store = DatabaseJtiStore(db, self.ensure_schema)
        self.card_ids = CardIds(db, self.ensure_schema, card_id_key)
        self._schema_ok_pid = 0
        self._schema_lock = threading.Lock()
        self._probe: tuple[float, str | None] = (0.0, None)
        self._probe_thread: threading.Thread | None = None
        self._probe_lock = threading.Lock()
        self._probe_pid = 0
        _open_stores.add(self)

    # -- schema --------------------------------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Once per process: bring the schema to this code's head (the embedded default needs no set-up step).

        Raises StoreUnavailable when the database cannot be reached, SchemaTooNew when a newer release migrated it.
        """
        if self._schema_ok_pid == os.getpid():
            return
        with self._schema_lock:
            if self._schema_ok_pid == os.getpid():
                return
            revision = current_revision(self.db)
            check_not_newer(revision)
            if revision != head_revision():
                upgrade(self.db)
            self._schema_ok_pid = os.getpid()

    def upgrade(self) -> tuple[str | None, str]:
        before, after = upgrade(self.db)
        self._schema_ok_pid = os.getpid()
        return before, after

    def revision(self) -> str | None:
        return current_revision(self.db)

    def prepare_serve(self) -> None:
        """`cds-service serve`, before forking: migrate, or stop start-up with a message that says why; then write
        the audit records an earlier run spilled."""
        try:
            before, after = self.upgrade()
            # Read (or make) the card-id key once here: the forked workers inherit it and never wait for it.
            self.card_ids.key()
            if before != after:
                log.info("database %s migrated from %s to %s", safe_url(self.db.url), before or "empty", after)
            if self.spill_dir is not None:
                log.info("audit spill folder: %s", self.spill_dir)
                self.replay_spill()
        except StoreUnavailable as exc:
            raise RuntimeError(f"cannot reach the database {safe_url(self.db.url)}: {exc}") from exc
        finally:
            # The master's connections must not be shared with the workers it forks.
            self.db.dispose()

    def replay_spill(self, folder: Path | None = None) -> spill.ReplayResult:
        """Write spilled audit records and the journals of processes that ended (from `folder`, default the spill
        folder) to the database, idempotently on the call id."""
        folder = folder or self.spill_dir
        if folder is None:
            return spill.ReplayResult()
        result = spill.replay(
            self.db,
            folder,
            lambda conn, entries: write_batch(conn, self.db.backend, entries),
            self.ensure_schema,
            (spill.PATTERN, journal.PATTERN),
        )
        metrics.audit_written(result.inserted, from_spill=True)
        return result

    # -- health --------------------------------------------------------------------------------------------------
    def _check(self) -> str | None:
        """None when the store works, else why not."""
        try:
            self.ensure_schema()
            self.db.ping()
        except (StoreUnavailable, SchemaTooNew) as exc:
            return str(exc)
        return None

    def _probe_now(self, wait: float) -> str | None:
        """Probe in a helper thread, waiting at most `wait` s: a database that hangs (a dropped network) must not
        hang /health or /ready past their callers' timeouts. One probe at a time per process."""
        with self._probe_lock:
            thread = self._probe_thread
            if thread is None or not thread.is_alive() or self._probe_pid != os.getpid():

                def probe() -> None:
                    self._probe = (time.monotonic(), self._check())

                thread = threading.Thread(target=probe, name="cds-store-probe", daemon=True)
                self._probe_thread, self._probe_pid = thread, os.getpid()
                thread.start()
        thread.join(wait)
        if thread.is_alive():
            return f"the database did not answer within {wait:g} s"
        return self._probe[1]

    def health(self) -> dict[str, Any]:
        """For /health (liveness, always 200): the store's state, probed at most every few seconds."""
        checked_at, problem = self._probe
        if time.monotonic() - checked_at > _HEALTH_TTL:
            problem = self._probe_now(wait=0.5)
        return self._describe(problem)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For /ready: probe now; ready when the database answers and audit records are being written."""
        body = self._describe(self._probe_now(wait=2.0))
        return body.get("status") != "degraded", body

    def _describe(self, problem: str | None) -> dict[str, Any]:
        writing = isinstance(self.audit, AuditWriter)
        audit_ok = not writing or self.writer.healthy()
        # A journal that cannot be appended to (a full disk): calls answer, but not durably.
        disk = self.writer.journal_problem() if writing else None
        status = "ok" if problem is None and audit_ok else "unreachable" if problem else "audit writes failing"
        store: dict[str, Any] = {
            "backend": self.db.backend,
            "status": "audit journal failing" if disk and status == "ok" else status,
        }
        if problem or disk:
            store["error"] = "; ".join(filter(None, [problem, disk]))
        store["audit"] = self.writer.stats() if isinstance(self.audit, AuditWriter) else "off"
        if self.spill_dir is not None and (waiting := len(spill.pending_files(self.spill_dir))):
            # Spilled by workers that stopped while the database was down: the next start writes them.
            store["spillFiles"] = waiting
        if self.jti_store.failures:
            store["jtiFailures"] = self.jti_store.failures
        body: dict[str, Any] = {"store": store}
        if store["status"] != "ok":
            body["status"] = "degraded"
        return body

    # -- feedback ------------------------------------------------------------------------------------------------
    def save_feedback(self, service_id: str, items: list[FeedbackItem], identity: Identity) -> SaveResult:
        # Cards this worker answered a moment ago may still be queued: write them so the feedback links to them.
        # Another worker's or instance's queued cards are recognised by their uuid's mark (card_ids) instead.
        if isinstance(self.audit, AuditWriter):
            self.writer.flush(timeout=1.0)
        return save_feedback(
            self.db,
            self.ensure_schema,
            service_id,
            items,
            identity,
            recognises=lambda card: self.card_ids.recognises(service_id, card),
        )

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def server_hooks(self) -> dict[str, Any]:
        """gunicorn hooks: a fresh pool in each forked worker; every answered record written before a worker exits."""

        def post_fork(_server: Any, _worker: Any) -> None:
            self.db.after_fork()

        def post_worker_init(_worker: Any) -> None:
            # The writer starts with the worker: it replays the journal a killed worker left, without waiting
            # for this worker's first call.
            if isinstance(self.audit, AuditWriter):
                self.writer.start()

        def worker_exit(_server: Any, _worker: Any) -> None:
            self.writer.close()  # what the database does not take in time goes to the spill folder

        return {"post_fork": post_fork, "post_worker_init": post_worker_init, "worker_exit": worker_exit}

    def close(self) -> None:
        self.writer.close()
        self.db.dispose()


def open_store(settings: Settings, instance_path: str | os.PathLike[str]) -> Store:
    """The Store for the settings (CDS_DATABASE_URL, CDS_AUDIT, CDS_AUDIT_SPILL_DIR, CDS_AUDIT_DURABILITY); connects
    lazily."""
    known_revisions()  # read the migration scripts now, once, rather than on a hook's first audit write
    spill_dir = Path(settings.audit_spill_dir or Path(instance_path) / "audit-spill")
    db = Database(database_url(settings.database_url, instance_path))
    return Store(
        db,
        audit=settings.audit,
        spill_dir=spill_dir,
        card_id_key=settings.card_id_key or None,
        durability=settings.audit_durability,
    )


@atexit.register
def _close_open_stores() -> None:
    # Outside gunicorn (flask run, the test client, scripts) this is what writes the last queued records.
    for store in list(_open_stores):
        try:
            store.close()
        except Exception:  # at exit, a failure to close one store must not stop the others
            log.exception("closing the store failed")
