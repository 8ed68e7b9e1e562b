"""Store test helpers: a fresh database per test (SQLite always, PostgreSQL when CDS_TEST_DATABASE_URL is set)."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, select, text
from sqlalchemy.engine import make_url

from cds_service.engine.outcome import ActionRecord, CardRecord, VerdictRecord
from cds_service.store import Store
from cds_service.store.db import Database, database_url

from . import builders as b

PG_URL = os.environ.get("CDS_TEST_DATABASE_URL")
# Every store test runs on SQLite; on PostgreSQL too when a server is named (.ci/run always names one).
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


@contextlib.contextmanager
def temp_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database URL nobody else uses: a SQLite file in tmp_path, or a new PostgreSQL schema dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'cds.sqlite3'}"
        return
    assert PG_URL, "CDS_TEST_DATABASE_URL is not set"
    base = make_url(PG_URL)
    schema = f"cds_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        # search_path as a libpq option: every connection the app (or a server subprocess) opens lands in it.
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def store_for(url: str, **kwargs: Any) -> Store:
    return Store(Database(database_url(url, "/nonexistent")), **kwargs)


def rows(url: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params or {}).all())
    finally:
        engine.dispose()


def table_rows(url: str, table: Table) -> list[Any]:
    """Every row of one of the store's tables, read through its model (JSON and timestamps decoded)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table).order_by(*table.primary_key.columns)).all())
    finally:
        engine.dispose()


def unreachable_url(backend: str, tmp_path: Path) -> str:
    """A database that cannot be reached: a SQLite file in a missing folder, or a closed PostgreSQL port."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'missing' / 'cds.sqlite3'}"
    assert PG_URL
    return make_url(PG_URL).set(port=free_port()).render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def flagged_call(region: str = "lumbar", rid: str = "sr1") -> dict[str, Any]:
    """An order-sign request whose one order is flagged (digital motion x-ray of the spine region)."""
    site = {"lumbar": ("122496007", "Lumbar spine"), "cervical": ("122494005", "Cervical spine")}[region]
    return b.hook_request(
        "order-sign", [b.service_request(rid, text=f"Digital motion x-ray of the {region} spine", body_site=site)]
    )


def plain_call(rid: str = "sr1") -> dict[str, Any]:
    """An order-sign request whose order is not flagged (a plain lumbar spine x-ray)."""
    return b.hook_request(
        "order-sign", [b.service_request(rid, text="XR lumbar spine 2 views", body_site=("122496007", "Lumbar spine"))]
    )


class TcpProxy:
    """A real TCP forwarder to a database server that a test can cut and restore (a network outage)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(32)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            # shutdown() first: close() alone leaves the accept() blocked in another thread running, and the
            # kernel goes on accepting connections for it.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b_ in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b_), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def down_then_up(backend: str, tmp_path: Path, url: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(url, bring_up): a database that is down until bring_up() (SQLite: its folder appears; PostgreSQL: a proxy
    to the real server starts listening)."""
    if backend == "sqlite":
        folder = tmp_path / "later"
        yield f"sqlite:///{folder / 'cds.sqlite3'}", folder.mkdir
        return
    parsed = make_url(url)
    proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    try:
        yield parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy.start
    finally:
        proxy.stop()


@contextlib.contextmanager
def outage(backend: str, url: str) -> Iterator[tuple[str, Any, Any]]:
    """(url the server uses, cut(), restore()): a database that works until cut() and again after restore().

    SQLite: another process holds its write lock (writes wait out the busy timeout, then fail); PostgreSQL: the
    network path through a real TCP proxy is cut."""
    if backend == "sqlite":
        holder: list[sqlite3.Connection] = []

        def lock() -> None:
            conn = sqlite3.connect(make_url(url).database or "", isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            holder.append(conn)

        def unlock() -> None:
            conn = holder.pop()
            conn.execute("ROLLBACK")
            conn.close()

        yield url, lock, unlock
        return
    parsed = make_url(url)
    proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    proxy.start()
    try:
        through = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        yield through, proxy.stop, proxy.start
    finally:
        proxy.stop()


def verdict_record(stored: dict[str, Any]) -> VerdictRecord:
    """The typed record of a verdict's stored JSON (any version), as a replay reads it back."""
    record = VerdictRecord.from_json(stored)
    assert record is not None
    return record


def card_record(stored: dict[str, Any]) -> CardRecord:
    """The typed record of a card's stored summary."""
    record = CardRecord.from_json(stored)
    assert record is not None
    return record


def action_record(stored: dict[str, Any]) -> ActionRecord:
    """The typed record of a systemAction's stored summary."""
    record = ActionRecord.from_json(stored)
    assert record is not None
    return record
