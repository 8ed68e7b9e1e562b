"""JWT ids seen, in the database: one store for every worker and instance, so a replayed token is refused anywhere."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import delete, update
from sqlalchemy.exc import SQLAlchemyError

from ..auth import MemoryJtiStore
from .audit_writer import clean, column_limit, insert_ignoring_duplicates
from .db import Database, SchemaTooNew, StoreUnavailable, short_error
from .models import jti_seen

log = logging.getLogger(__name__)


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

    def remember(self, iss: str, jti: str, expires_at: float) -> bool:
        iss = clean(iss, column_limit(jti_seen, "iss"))
        jti = clean(jti, column_limit(jti_seen, "jti"))
        now = time.time()
        try:
            self._ensure_schema()
            with self.db.engine.begin() as conn:
                # RETURNING says whether the row went in (rowcount is not reliable for ON CONFLICT on every driver).
                added = (
                    conn.execute(
                        insert_ignoring_duplicates(jti_seen, self.db.backend)
                        .values(iss=iss, jti=jti, expires_at=expires_at)
                        .returning(jti_seen.c.jti)
                    ).first()
                    is not None
                )
                if not added:
                    # Already there: a replay, unless the earlier token has expired (its row not yet cleaned up).
                    added = (
                        conn.execute(
                            update(jti_seen)
                            .where(jti_seen.c.iss == iss, jti_seen.c.jti == jti, jti_seen.c.expires_at <= now)
                            .values(expires_at=expires_at)
                            .returning(jti_seen.c.jti)
                        ).first()
                        is not None
                    )
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

    def _maybe_clean_up(self, now: float) -> None:
        with self._lock:
            if now < self._next_cleanup:
                return
            self._next_cleanup = now + self._cleanup_every
        with self.db.engine.begin() as conn:
            removed = conn.execute(delete(jti_seen).where(jti_seen.c.expires_at < now)).rowcount
        if removed:
            log.debug("removed %d expired jti rows", removed)
