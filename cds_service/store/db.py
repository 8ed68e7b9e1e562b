"""Engine set-up: the database URL, per-process engines (safe across gunicorn's fork), and the schema's state."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..config import ConfigError

log = logging.getLogger(__name__)

SQLITE_FILE = "cds.sqlite3"
# Any constant shared by every process that migrates the same PostgreSQL database (pg_advisory_lock key).
_PG_MIGRATION_LOCK = 7_304_117_502


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (or its schema cannot be used) right now."""


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer cds-service than this one: refusing to write to it."""


def database_url(configured: str | None, instance_path: str | os.PathLike[str]) -> URL:
    """CDS_DATABASE_URL, or a SQLite file in the instance folder; plain postgresql:// URLs use psycopg 3."""
    if not configured:
        folder = Path(instance_path)
        folder.mkdir(parents=True, exist_ok=True)
        return make_url(f"sqlite:///{folder / SQLITE_FILE}")
    try:
        url = make_url(configured)
    except ArgumentError:
        raise ConfigError(
            "CDS_DATABASE_URL: not a database URL (expected sqlite:///... or postgresql+psycopg://...)"
        ) from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"CDS_DATABASE_URL: only sqlite:/// and postgresql+psycopg:// are supported, got {safe_url(url)!r}"
        )
    return url


def safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def short_error(exc: BaseException) -> str:
    """One line for logs and /health: the driver's message, never the SQL statement or its parameters."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return f"{type(orig).__name__}: {first[:300]}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the report and the hook workers read while the audit writer writes; NORMAL is durable across a
    # process crash (the case that matters for a server), at a fraction of FULL's fsyncs.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _json(value: Any) -> str:
    # orjson: a fraction of the json module's time, and the writer thread shares the GIL with the hooks.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def make_engine(url: URL, *, relaxed: bool = False) -> Engine:
    """An engine for this process. hide_parameters: errors never echo audit data into logs.

    `relaxed` (PostgreSQL): for the JWT replay records only: commits that do not wait for the WAL flush
    (synchronous_commit off: a crash may lose the last fraction of a second of records, which only reopens a
    token's replay window its exp closes within minutes) and no ping before each use (a dead connection fails one
    check, which falls back to this process's memory, and is replaced)."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, hide_parameters=True, json_serializer=_json, connect_args={"timeout": 15})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 5
    if relaxed:
        # Added to the URL's own libpq options (a search_path, say), which connect_args would otherwise replace.
        given = url.query.get("options", "")
        given = " ".join(given) if isinstance(given, tuple) else given
        connect_args["options"] = f"{given} -c synchronous_commit=off".strip()
    return create_engine(
        url,
        hide_parameters=True,
        json_serializer=_json,
        pool_pre_ping=not relaxed,
        pool_size=5,
        max_overflow=5,
        pool_timeout=5,
        connect_args=connect_args,
    )


class Database:
    """One database for the whole app; each process (gunicorn worker) lazily gets its own engine and pool."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.backend = url.get_backend_name()
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._pid = 0
        self._relaxed: Engine | None = None
        self._relaxed_pid = 0

    @property
    def engine(self) -> Engine:
        if self._engine is None or self._pid != os.getpid():
            self._engine, self._pid = self._fresh(self._engine, self._pid, relaxed=False)
        return self._engine

    def _fresh(self, engine: Engine | None, pid: int, *, relaxed: bool) -> tuple[Engine, int]:
        """This process's engine: the given one if it was made here, else a new one (under the lock)."""
        with self._lock:
            current = self._relaxed if relaxed else self._engine
            if current is not None and (self._relaxed_pid if relaxed else self._pid) == os.getpid():
                return current, os.getpid()
            if engine is not None:
                # Inherited from the parent: drop its pool without closing the parent's sockets.
                engine.dispose(close=False)
            return make_engine(self.url, relaxed=relaxed), os.getpid()

    @property
    def relaxed_engine(self) -> Engine:
        """The engine for records that may trade durability for speed (see make_engine); SQLite: the engine."""
        if self.backend != "postgresql":
            return self.engine
        if self._relaxed is None or self._relaxed_pid != os.getpid():
            self._relaxed, self._relaxed_pid = self._fresh(self._relaxed, self._relaxed_pid, relaxed=True)
        return self._relaxed

    def after_fork(self) -> None:
        """gunicorn post_fork: forget the parent's pool now rather than on first use."""
        with self._lock:
            if self._engine is not None and self._pid != os.getpid():
                self._engine.dispose(close=False)
                self._engine = None
            if self._relaxed is not None and self._relaxed_pid != os.getpid():
                self._relaxed.dispose(close=False)
                self._relaxed = None

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None
            if self._relaxed is not None and self._relaxed_pid == os.getpid():
                self._relaxed.dispose()
            self._relaxed = None

    def ping(self) -> None:
        """Raise StoreUnavailable unless a round trip to the database works."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(short_error(exc)) from exc

    @contextlib.contextmanager
    def migration_lock(self) -> Iterator[None]:
        """Serialise migrations between processes: an advisory lock (PostgreSQL) or a lock file (SQLite)."""
        if self.backend == "postgresql":
            with self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                    conn.commit()
            return
        database = self.url.database
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(database).with_name(Path(database).name + ".migrate-lock")
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
