"""JWT ids seen, in the database: one store for every worker and instance, so a replayed token is refused anywhere."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from .audit_writer import clean, column_limit
from .db import Database, SchemaTooNew, StoreUnavailable, short_error
from .models import jti_seen

log = logging.getLogger(__name__)


def _claim_statement(backend: str) -> Any:
    """INSERT ... ON CONFLICT (iss, jti) DO UPDATE ... WHERE expired RETURNING jti, built once (it is on every call)."""
    dialect = postgresql if backend == "postgresql" else sqlite
    insert = dialect.insert(jti_seen).values(
        iss=bindparam("iss"), jti=bindparam("jti"), expires_at=bindparam("expires_at")
    )
    return insert.on_conflict_do_update(
        index_elements=[jti_seen.c.iss, jti_seen.c.jti],
        set_={"expires_at": insert.excluded.expires_at},
        where=jti_seen.c.expires_at <= bindparam("now"),
    ).returning(jti_seen.c.jti)


_PG_CLAIM = (
    "INSERT INTO jti_seen (iss, jti, expires_at) VALUES (%s, %s, %s) "
    "ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at WHERE jti_seen.expires_at <= %s "
    "RETURNING jti"
)


class MemoryJtiStore:
    """In-process jti store: correct for one process only (tests, `flask run`, the SQLite default)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._prune_at = 10000

    def remember(self, iss: str, jti: str, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            if len(self._seen) > self._prune_at:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
                # Prune again only when the live set has doubled: pruning on every call would be O(n) per call.
                self._prune_at = max(10000, 2 * len(self._seen))
            key = (iss, jti)
            if self._seen.get(key, 0) > now:
                return False
            self._seen[key] = expires_at
            return True


class DatabaseJtiStore:
    """JtiStore on the jti_seen table: the primary key (iss, jti) makes the check-and-insert atomic across processes.

    When the database cannot be reached, it falls back to remembering in this process (replays through the same
    worker are still refused) so hooks keep answering; the failure is logged and counted.
    """

    def __init__(self, db: Database, ensure_schema: Callable[[], None], *, cleanup_every: float = 60.0) -> None:
        self.db = db
        self._ensure_schema = ensure_schema
        self._fallback = MemoryJtiStore()
        self._cleanup_every = cleanup_every
        self._next_cleanup = 0.0
        self._lock = threading.Lock()
        self.failures = 0
        self._claim = _claim_statement(db.backend)

    def remember(self, iss: str, jti: str, expires_at: float) -> bool:
        iss = clean(iss, column_limit(jti_seen, "iss"))
        jti = clean(jti, column_limit(jti_seen, "jti"))
        now = time.time()
        try:
            self._ensure_schema()
            if self.db.backend == "postgresql":
                added = self._claim_postgresql(iss, jti, expires_at, now)
            else:
                with self._connect() as conn:
                    # One statement, atomic across processes: insert, or revive a row whose token has expired (not
                    # yet cleaned up); a row comes back only then. Nothing back means a live token's jti: a replay.
                    params = {"iss": iss, "jti": jti, "expires_at": expires_at, "now": now}
                    added = conn.execute(self._claim, params).first() is not None
            self._maybe_clean_up(now)
        except (SQLAlchemyError, StoreUnavailable, SchemaTooNew) as exc:
            with self._lock:
                self.failures += 1
                failures = self.failures
            if failures == 1 or failures % 100 == 0:
                log.error(
                    "jti store unreachable (%d failures), checking replays in this process only: %s",
                    failures,
                    short_error(exc),
                )
            return self._fallback.remember(iss, jti, expires_at)
        return bool(added)

    def _claim_postgresql(self, iss: str, jti: str, expires_at: float, now: float) -> bool:
        """The same statement on the driver's connection, server-side prepared (psycopg prepare=True): the hook path
        pays one round trip and no SQL compilation; autocommit on the relaxed engine (asynchronous commit)."""
        raw = self.db.relaxed_engine.raw_connection()
        try:
            driver = raw.driver_connection
            if driver is None:
                raise StoreUnavailable("no database connection")
            driver.autocommit = True
            with driver.cursor() as cursor:
                cursor.execute(_PG_CLAIM, (iss, jti, expires_at, now), prepare=True)
                return cursor.fetchone() is not None
        except Exception:
            raw.invalidate()  # a connection in an unknown state is not given back to the pool
            raise
        finally:
            raw.close()

    def _connect(self) -> Any:
        # PostgreSQL: autocommit, the one statement is its own transaction, without BEGIN/COMMIT round trips on the
        # hook path, on the relaxed engine (asynchronous commit, no ping per use: measured 491 -> see bench/README).
        # SQLite: a plain transaction is the faster (110 vs 160 us).
        if self.db.backend == "postgresql":
            return self.db.relaxed_engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.db.engine.begin()

    def _maybe_clean_up(self, now: float) -> None:
        with self._lock:
            if now < self._next_cleanup:
                return
            self._next_cleanup = now + self._cleanup_every
        with self.db.engine.begin() as conn:
            removed = conn.execute(delete(jti_seen).where(jti_seen.c.expires_at < now)).rowcount
        if removed:
            log.debug("removed %d expired jti rows", removed)
