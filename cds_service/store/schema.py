"""Migrations: upgrade to the code's head, read the database's revision, refuse a schema newer than the code."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from .db import Database, SchemaTooNew, StoreUnavailable, short_error

VERSION_TABLE = "cds_alembic_version"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@functools.cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # noqa: S101 - the package ships at least one migration
    return head


@functools.cache
def known_revisions() -> frozenset[str]:
    # Cached: reading the scripts is ~50 ms of Python, not to be paid again on a worker's first audit write.
    return frozenset({script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()})


def current_revision(db: Database) -> str | None:
    """The database's revision (None: no schema yet); StoreUnavailable when it cannot be read."""
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    except SQLAlchemyError as exc:
        raise StoreUnavailable(short_error(exc)) from exc


def check_not_newer(revision: str | None) -> None:
    if revision is not None and revision not in known_revisions():
        raise SchemaTooNew(
            f"The database schema is at revision {revision!r}, which this version of cds-service does not know "
            f"(its newest is {head_revision()!r}): it was migrated by a newer release. Run that release, or point "
            "CDS_DATABASE_URL at this release's database; nothing was changed."
        )


# Alembic's `context` and `op` are module-level proxies: two migrations at once in one process (two apps, or a
# writer thread and a request thread) would trample each other, so they take turns here as well as across processes.
_PROCESS_LOCK = threading.Lock()


def upgrade(db: Database) -> tuple[str | None, str]:
    """Migrate to head (one migration at a time, in this process and across processes); (before, after)."""
    try:
        with _PROCESS_LOCK, db.migration_lock():
            before = current_revision(db)
            check_not_newer(before)
            if before != head_revision():
                config = alembic_config()
                with db.engine.begin() as conn:
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")
            return before, current_revision(db) or ""
    except SQLAlchemyError as exc:
        raise StoreUnavailable(short_error(exc)) from exc
    except OSError as exc:  # the SQLite file's folder is missing or not writable
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
