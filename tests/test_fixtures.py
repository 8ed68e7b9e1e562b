"""Golden files: each hook request in fixtures/hooks/ gives the response beside it, via the CLI and over HTTP."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.cli import main

from .conftest import ROOT
from .fhir_server import fhir_server
from .test_crd_test_kit import SERVICES

FIXTURES = ROOT / "fixtures" / "hooks"
CASES = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def normalise(value: Any, seen: set[str], key: str = "") -> Any:
    """Replace fields that differ per call (card/suggestion uuids, assertion ids, dates) after checking their shape."""
    if isinstance(value, dict):
        if value.get("url") == "coverage-assertion-id":
            assert re.fullmatch(r"[0-9a-f]{32}", value["valueString"])
            assert value["valueString"] not in seen, "coverage-assertion-id repeated"
            seen.add(value["valueString"])
            return {**value, "valueString": "<assertion-id>"}
        authored = value.get("authoredOn")
        # A replacement order is authored on the day of the call (a client's own order keeps its own time).
        if value.get("resourceType") == "ServiceRequest" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(authored)):
            value = {**value, "authoredOn": "<date>"}
        if value.get("url") == "date" and "valueDate" in value:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", value["valueDate"])
            return {**value, "valueDate": "<date>"}
        return {k: normalise(v, seen, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, seen) for v in value]
    if key == "uuid":
        assert isinstance(value, str) and _UUID.match(value), f"not a UUID: {value!r}"
        assert uuid.UUID(value).version == 4
        assert value not in seen, "uuid repeated"
        seen.add(value)
        return "<uuid>"
    return value


def expected(case: str) -> Any:
    return normalise(json.loads((FIXTURES / f"{case}.response.json").read_text()), set())


def test_there_are_golden_cases_for_both_hooks_and_versions() -> None:
    assert any(c.startswith("order-select") for c in CASES)
    assert any(c.startswith("order-sign") for c in CASES)
    assert any("r5" in c for c in CASES) and any("r4" in c for c in CASES)
    assert all((FIXTURES / f"{c}.response.json").exists() for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_cli_evaluate_gives_the_golden_response(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(FIXTURES / f"{case}.request.json")]) == 0
    assert normalise(json.loads(capsys.readouterr().out), set()) == expected(case)


@pytest.fixture
def http_client(tmp_path: Path) -> FlaskClient:
    app = create_app({"AUTH": "off", "ALLOW_HTTP_FHIR": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'a.sqlite3'}"})
    return app.test_client()


@pytest.mark.parametrize("case", CASES)
def test_http_call_gives_the_golden_response(case: str, http_client: FlaskClient) -> None:
    body = json.loads((FIXTURES / f"{case}.request.json").read_text())
    service = SERVICES[body["hook"]]
    # The EHR's FHIR server is replaced by a local stand-in that knows no Coverage: the same facts as offline.
    with fhir_server() as (base, behaviour):
        if "fhirServer" in body:
            body["fhirServer"] = base
        response = http_client.post(f"/cds-services/{service}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/json"
    assert normalise(response.get_json(), set()) == expected(case)
    # The Coverage is read from the FHIR server only when an order is flagged and prefetch did not settle it.
    needs_read = bool(response.get_json()["cards"]) and "coverage" not in body.get("prefetch", {})
    assert bool(behaviour.requests) == (needs_read and "fhirServer" in body)


def _paths() -> list[Path]:
    return [FIXTURES / f"{c}.request.json" for c in CASES]


def test_fixture_requests_are_valid_cds_hooks_requests() -> None:
    for path in _paths():
        body = json.loads(path.read_text())
        assert body["hook"] in SERVICES, path
        assert _UUID.match(body["hookInstance"]), path
        hook = body["hook"]
        if hook == "order-dispatch":
            assert all(isinstance(r, str) for r in body["context"]["dispatchedOrders"]), path
        elif hook != "encounter-start":
            bundle = "appointments" if hook == "appointment-book" else "draftOrders"
            assert body["context"][bundle]["resourceType"] == "Bundle", path
