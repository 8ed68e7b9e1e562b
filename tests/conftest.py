"""Shared fixtures: an app without client authentication and its test client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service import create_app

ROOT = Path(__file__).resolve().parent.parent
SELECT = "dsv-order-select"
SIGN = "dsv-order-sign"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    application = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})
    application.config["TESTING"] = True
    yield application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
