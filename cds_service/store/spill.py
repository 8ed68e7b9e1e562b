"""Audit records the database could not take before a process exited: spilled to a local file, written back later."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, select

from ..audit import STORED_FIELDS, CallRecord
from .db import Database
from .models import audit_call

log = logging.getLogger(__name__)

FORMAT = "cds-audit-spill/1"
PATTERN = "audit-spill-*.jsonl"
_FIELDS = frozenset(STORED_FIELDS)
_CHUNK = 500

Entries = list[tuple[str, CallRecord]]
Writer = Callable[[Connection, Entries], None]


def encode(call_id: str, record: CallRecord) -> bytes:
    """One line: the record exactly as queued (times with their offset and microseconds, JSON as JSON), its id."""
    fields = record.stored_fields()
    # OPT_NON_STR_KEYS as the database's JSON columns do, so a replayed record equals one written directly.
    return orjson.dumps({"format": FORMAT, "callId": call_id, "record": fields}, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def decode(line: bytes) -> tuple[str, CallRecord]:
    """The (call id, record) of one line; ValueError when it is not a whole line of this format."""
    item = orjson.loads(line)
    if not isinstance(item, dict) or item.get("format") != FORMAT or not isinstance(item.get("callId"), str):
        raise ValueError("not an audit spill record")
    fields = item.get("record")
    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise ValueError("the record's fields are not CallRecord's")
    started_at = datetime.fromisoformat(fields["started_at"])
    if started_at.tzinfo is None:
        raise ValueError("started_at has no offset")
    return item["callId"], CallRecord(**(CallRecord.parts_from_json(fields) | {"started_at": started_at}))


def spill(folder: Path, entries: Entries) -> tuple[Path | None, int]:
    """Append the records to a new file of this process in `folder`, fsynced; (its path, records written).

    One file per call (the name carries the host, the pid, the time and a random part), so processes and workers
    never write into the same file. The file is locked while it is written: a replay skips it until done. A record
    that cannot be encoded is logged and left out (the database would have refused it too).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"audit-spill-{socket.gethostname()}-{os.getpid()}-{stamp}-{secrets.token_hex(4)}.jsonl"
    path = folder / name
    lines = []
    for call_id, record in entries:
        try:
            lines.append(encode(call_id, record))
        except (TypeError, orjson.JSONEncodeError) as exc:
            log.error("audit record %s for %s cannot be spilled: %s", call_id, record.service_id, exc)
    if not lines:
        return None, 0
    # The audit log holds patient data: readable by the service's user only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_folder(folder)  # the new file's name must survive a power cut as well as its content
    return path, len(lines)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ReplayResult:
    files: int = 0
    records: int = 0
    inserted: int = 0
    rejected_lines: int = 0
    skipped_files: int = 0  # locked: a live process is still writing them
    failed_files: int = 0  # the database refused the file: kept for the next attempt


def pending_files(folder: Path, pattern: str = PATTERN) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def replay(
    db: Database,
    folder: Path,
    write: Writer,
    ensure_schema: Callable[[], None],
    patterns: tuple[str, ...] = (PATTERN,),
    *,
    quiet: bool = False,
) -> ReplayResult:
    """Write every spilled record in `folder` to the database, one transaction per file, then delete the file.

    `patterns`: the files to take (spill files; journals of processes that ended are read the same way). `quiet`:
    a failure to write a file is logged at debug level (a live worker retrying in the background while the
    database is down), not as an error each time.

    Idempotent on the call id (INSERT ... ON CONFLICT DO NOTHING): a file replayed twice, or a record that did reach
    the database before its process gave up, is stored once. The file goes only after the commit; lines that are
    not whole records (a write cut short) are kept beside it as `<name>.rejected` for a person to look at.
    """
    result = ReplayResult()
    for path in sorted({p for pattern in patterns for p in pending_files(folder, pattern)}):
        with _locked(path) as handle:
            if handle is None:
                result.skipped_files += 1
                continue
            if os.fstat(handle.fileno()).st_nlink == 0:
                continue  # another process replayed and removed it while this one waited to open it
            entries, rejected = _read(handle.read(), path)
            try:
                ensure_schema()
                inserted = _write_file(db, entries, write)
            except Exception as exc:  # keep the file: the next start (or the operator) tries again
                level = logging.DEBUG if quiet else logging.ERROR
                log.log(level, "audit spill %s could not be written to the database (kept for a retry): %s", path, exc)
                result.failed_files += 1
                continue
            if rejected:
                rejected_path = path.with_name(path.name + ".rejected")
                with open(rejected_path, "ab") as out:
                    out.write(b"".join(rejected))
                    out.flush()
                    os.fsync(out.fileno())
                log.error("audit spill %s: %d lines are not records; kept in %s", path, len(rejected), rejected_path)
            path.unlink()
            fsync_folder(folder)
        result.files += 1
        result.records += len(entries)
        result.inserted += inserted
        result.rejected_lines += len(rejected)
        log.warning(
            "audit spill %s written to the database: %d records (%d were already there), file removed",
            path.name,
            len(entries),
            len(entries) - inserted,
        )
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Any]:
    """The file opened and exclusively locked, or None when another process holds it (still writing it)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:  # replayed and removed by another process since the folder was listed
        yield None
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield handle


def _read(data: bytes, path: Path) -> tuple[Entries, list[bytes]]:
    entries: Entries = []
    rejected: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if not line.strip():
            continue
        if not line.endswith(b"\n"):
            # A process killed (or a disk filled) in the middle of a write: that record's call never answered
            # (its line was not on disk), so there is nothing to write. Kept beside the file for a person to see.
            log.warning("audit file %s: torn last line (%d bytes) skipped", path.name, len(line))
            rejected.append(line + b"\n")
            continue
        try:
            entries.append(decode(line))
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            log.error("audit spill %s: a line is not a record (%s)", path.name, exc)
            rejected.append(line if line.endswith(b"\n") else line + b"\n")
    return entries, rejected


def _write_file(db: Database, entries: Entries, write: Writer) -> int:
    """Insert the entries in one transaction; how many were not in the database yet."""
    with db.engine.begin() as conn:
        known: set[str] = set()
        for chunk in _chunks([call_id for call_id, _ in entries]):
            known.update(conn.execute(select(audit_call.c.call_id).where(audit_call.c.call_id.in_(chunk))).scalars())
        for chunk in _chunks(entries):
            write(conn, chunk)
    return len({call_id for call_id, _ in entries} - known)


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
