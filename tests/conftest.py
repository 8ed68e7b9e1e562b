"""Shared fixtures: an app without client authentication and its test client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.runtime import services_of
from cds_service.store import _open_stores

from .store_support import BACKENDS, temp_database

ROOT = Path(__file__).resolve().parent.parent
SELECT = "dsv-order-select"
SIGN = "dsv-order-sign"


@pytest.fixture(autouse=True)
def _close_stores_opened_by_the_test() -> Iterator[None]:
    """Every app a test builds opens a store with a writer thread; close them so none outlives its temp folder."""
    before = set(_open_stores)
    yield
    for store in set(_open_stores) - before:
        store.close()


@pytest.fixture(autouse=True)
def _spill_audit_records_into_the_tests_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit records a test leaves unwritten at close go to its own folder, never to the shared instance folder
    (where the next server a test starts would write them into its database)."""
    monkeypatch.setenv("CDS_AUDIT_SPILL_DIR", str(tmp_path / "audit-spill"))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    application = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})
    application.config["TESTING"] = True
    yield application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backends under test: SQLite always, PostgreSQL when CDS_TEST_DATABASE_URL names one."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database nobody else uses (a SQLite file, or a fresh PostgreSQL schema dropped afterwards)."""
    with temp_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
def store_app(db_url: str) -> Iterator[Flask]:
    """An app without client authentication on the `db_url` database."""
    application = create_app({"AUTH": "off", "DATABASE_URL": db_url})
    application.config["TESTING"] = True
    yield application
    services_of(application).store.close()
