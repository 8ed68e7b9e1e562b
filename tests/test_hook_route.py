"""The hook calls' lean WSGI route answers exactly as the Flask route would: status, body and headers alike."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from werkzeug.test import Client

from cds_service import create_app
from cds_service.web.hook_route import HookRoute

from .conftest import SIGN
from .store_support import flagged_call, plain_call

ORIGIN = "https://sandbox.cds-hooks.org"
# Each answer's own ids differ between two calls: compare them as placeholders.
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}[0-9a-z.-]*")


@pytest.fixture
def cors_app(tmp_path: Path) -> Flask:
    return create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}", "CORS_ORIGINS": ORIGIN})


def _both(app: Flask) -> tuple[Client, Client]:
    route = app.wsgi_app
    assert isinstance(route, HookRoute)
    return Client(app), Client(route.flask_app)  # through the lean route; Flask alone (its call_service view)


def _answer(client: Client, body: bytes, **kwargs: Any) -> tuple[int, bytes, dict[str, str]]:
    response = client.post(f"/cds-services/{SIGN}", data=body, headers={"Origin": ORIGIN}, **kwargs)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "date"}
    return response.status_code, _UUID.sub(b"<uuid>", response.get_data()), headers


CASES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "a flagged order": (orjson.dumps(flagged_call()), {"content_type": "application/json"}),
    "an ordinary order": (orjson.dumps(plain_call()), {"content_type": "application/json"}),
    "not JSON": (b"{not json", {"content_type": "application/json"}),
    "a form body": (b"a=b", {"content_type": "application/x-www-form-urlencoded"}),
    "no body": (b"", {"content_type": "application/json"}),
    "a bad request": (orjson.dumps({"hook": "order-sign"}), {"content_type": "application/fhir+json"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_lean_route_answers_as_flask_does(cors_app: Flask, case: str) -> None:
    lean, flask_only = _both(cors_app)
    body, kwargs = CASES[case]
    assert _answer(lean, body, **kwargs) == _answer(flask_only, body, **kwargs)


def test_a_body_over_the_limit_is_a_413_before_it_is_read(tmp_path: Path) -> None:
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "MAX_BODY_BYTES": 500})
    lean, flask_only = _both(app)
    body = orjson.dumps(flagged_call())
    assert len(body) > 500
    for client in (lean, flask_only):
        status, answer, headers = _answer(client, body, content_type="application/json")
        assert status == 413 and headers["Cache-Control"] == "no-store"
        assert b"too large (limit 0.000477 MB)" in answer


def test_a_chunked_body_over_the_limit_is_a_413(tmp_path: Path) -> None:
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "MAX_BODY_BYTES": 500})
    body = orjson.dumps(flagged_call())
    # A chunked request as a server hands it on: no Content-Length, the stream ends where the body does.
    environ_overrides = {"wsgi.input_terminated": True}
    response = Client(app).post(
        f"/cds-services/{SIGN}",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        environ_overrides=environ_overrides,
        headers={"Transfer-Encoding": "chunked"},
    )
    assert response.status_code == 413
    assert orjson.loads(response.get_data())["issue"][0]["code"] == "too-costly"


def test_other_methods_and_paths_stay_with_flask(cors_app: Flask) -> None:
    lean, _ = _both(cors_app)
    assert lean.get(f"/cds-services/{SIGN}").status_code == 405
    assert lean.post("/cds-services/no-such-service", json=flagged_call()).status_code == 404
    assert lean.post(f"/cds-services/{SIGN}/", json=flagged_call()).status_code == 404
    preflight = lean.options(
        f"/cds-services/{SIGN}", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
