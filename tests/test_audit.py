"""The audit log: one record per call (failed calls too), never a token, off the hot path, and a database outage
that leaves hooks answering while /health and /ready say so."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import typing
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import make_url

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.runtime import services_of
from cds_service.store import Store
from cds_service.store.models import audit_call

from .conftest import SIGN
from .jwt_support import EHR, PUBLIC_URL, SIGN_URL, bearer, claims, ec_key, issuers_file, jwks, token
from .store_support import (
    BACKENDS,
    PG_URL,
    card_record,
    down_then_up,
    flagged_call,
    rows,
    store_for,
    table_rows,
    temp_database,
    unreachable_url,
    wait_for,
)

SECRET_TOKEN = "fhir-access-token-7c1e-SECRET"
SECRET_JWT = "eyJhbGciOiJFUzM4NCJ9.eyJpc3MiOiJzZWNyZXQifQ.SECRET-JWT-SIGNATURE"


@pytest.fixture
def app(store_app: Flask) -> Flask:
    """The store tests' app runs on each backend (conftest's `client` then calls it)."""
    return store_app


def store_of(app: Flask) -> Store:
    store: Store = services_of(app).store
    return store


def calls(url: str) -> list[Any]:
    return table_rows(url, audit_call)


def test_a_call_is_audited_once_with_what_it_judged_and_returned(app: Flask, client: FlaskClient, db_url: str) -> None:
    body = flagged_call("lumbar")
    body["context"]["userId"] = "Practitioner/prac-9"
    response = client.post(f"/cds-services/{SIGN}", json=body)
    assert response.status_code == 200
    assert store_of(app).writer.flush(10)
    [row] = calls(db_url)
    assert row.service_id == SIGN and row.hook == "order-sign" and row.hook_instance == body["hookInstance"]
    assert row.user_id == "Practitioner/prac-9" and row.patient_id == "pat-1"
    assert row.status == 200 and row.error is None and row.duration_ms > 0
    [order] = row.orders
    assert order["order"] == "ServiceRequest/sr1" and order["verdict"] == "flagged"
    assert {e["kind"] for e in order["evidenceFor"]} >= {"technique", "anatomy"}
    assert order["v"] == 2 and order["rule"] == "technique-named" and order["policyVersion"]
    assert [e["kind"] for e in order["deciding"]] == ["technique"]
    [card] = response.get_json()["cards"]
    assert [c["uuid"] for c in row.cards] == [card["uuid"]]
    assert [s["uuid"] for s in row.cards[0]["suggestions"]] == [s["uuid"] for s in card["suggestions"]]
    assert [s["actions"] for s in row.cards[0]["suggestions"]] == [["delete", "create"]]
    assert row.cards[0]["rule"] == "technique-named" and row.cards[0]["kind"] == "alternative"
    assert isinstance(row.system_actions, list) and isinstance(row.coverage_assertions, list)
    assert [r.card_uuid for r in rows(db_url, "SELECT card_uuid FROM audit_card")] == [card["uuid"]]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        ({"hook": "order-select", "hookInstance": "00000000-0000-4000-8000-000000000000", "context": {}}, "answers"),
        ({"hook": "order-sign", "context": {}}, "hookInstance"),
    ],
)
def test_failed_calls_are_audited_with_the_reason(
    app: Flask, client: FlaskClient, db_url: str, body: Any, reason: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(f"/cds-services/{SIGN}", data=body, content_type="application/json")
    else:
        response = client.post(f"/cds-services/{SIGN}", json=body)
    assert response.status_code == 400
    assert store_of(app).writer.flush(10)
    [row] = calls(db_url)
    assert row.status == 400 and reason in row.error
    assert row.orders == [] and row.cards == []


def test_the_jwt_and_the_fhir_access_token_are_never_stored(
    app: Flask, client: FlaskClient, db_url: str, backend: str, tmp_path: Path
) -> None:
    body = flagged_call("cervical")
    body["fhirServer"] = "https://ehr.example/fhir"
    body["fhirAuthorization"] = {
        "access_token": SECRET_TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "user/Patient.read",
        "subject": "cds-service",
    }
    body["prefetch"] = {"patient": {"resourceType": "Patient", "id": "pat-1"}, "coverage": None}
    response = client.post(f"/cds-services/{SIGN}", json=body, headers={"Authorization": f"Bearer {SECRET_JWT}"})
    assert response.status_code == 200
    bad = client.post(f"/cds-services/{SIGN}", json={**body, "hook": "x"}, headers={"Authorization": SECRET_JWT})
    assert bad.status_code == 400
    card = response.get_json()["cards"][0]
    feedback = {
        "feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-02T10:00:00Z"}]
    }
    assert (
        client.post(
            f"/cds-services/{SIGN}/feedback", json=feedback, headers={"Authorization": f"Bearer {SECRET_JWT}"}
        ).status_code
        == 200
    )
    store_of(app).close()
    dump = repr([rows(db_url, f"SELECT * FROM {table}") for table in ("audit_call", "audit_card", "feedback")])  # noqa: S608
    assert "ServiceRequest/sr1" in dump  # the dump is real
    for secret in (SECRET_TOKEN, SECRET_JWT, "SECRET"):
        assert secret not in dump
    if backend == "sqlite":  # every byte on disk, free pages and the write-ahead log included
        for path in tmp_path.glob("cds.sqlite3*"):
            assert b"SECRET" not in path.read_bytes()


def test_record_only_queues_and_close_writes_everything(db_url: str) -> None:
    # A long batch window keeps records in the queue: close() (what gunicorn's worker_exit calls) must write them.
    store = store_for(db_url)
    store.writer.batch_window = 30.0
    for i in range(50):
        store.writer.record(CallRecord(service_id=SIGN, hook_instance=f"call-{i}"))
    assert store.writer.stats()["pending"] == 50
    store.writer.close(timeout=20)
    assert sorted(r.hook_instance for r in calls(db_url)) == sorted(f"call-{i}" for i in range(50))
    store.close()


def test_retried_batches_are_not_duplicated(db_url: str) -> None:
    store = store_for(db_url)
    record = CallRecord(service_id=SIGN, hook_instance="once", cards=[card_record({"uuid": "card-1"})])
    store.writer._write([("same-call-id", record)])
    store.writer._write([("same-call-id", record)])  # a batch whose commit was lost and is sent again
    assert len(calls(db_url)) == 1
    store.close()


def test_a_record_the_database_refuses_does_not_block_the_others(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = store_for(db_url)
    store.upgrade()
    good = CallRecord(service_id=SIGN, hook_instance="good\x00with-nul", user_id="u" * 5000)
    # A status no integer column holds (nor the journal's JSON): refused wherever it is written.
    poison = CallRecord(service_id=SIGN, hook_instance="poison", status=2**70)
    store.writer.record(poison)
    store.writer.record(good)
    assert store.writer.flush(10)
    [row] = calls(db_url)
    assert row.hook_instance == "goodwith-nul" and len(row.user_id) == 500
    assert store.writer.stats()["dropped"] == 1
    assert "refused" in caplog.text
    store.close()


def test_audit_off_stores_no_calls_but_keeps_feedback(db_url: str) -> None:
    app = create_app({"AUTH": "off", "DATABASE_URL": db_url, "AUDIT": "false"})
    client = app.test_client()
    assert client.post(f"/cds-services/{SIGN}", json=flagged_call()).status_code == 200
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-11-02T10:00:00Z"}]}
    assert client.post(f"/cds-services/{SIGN}/feedback", json=feedback).status_code == 200
    assert client.get("/health").get_json()["store"]["audit"] == "off"
    services_of(app).store.close()
    assert calls(db_url) == []
    assert len(rows(db_url, "SELECT * FROM feedback")) == 1


def test_database_down_hooks_answer_health_degraded_ready_503(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = create_app({"AUTH": "off", "DATABASE_URL": unreachable_url(backend, tmp_path)})
    client = app.test_client()
    store = store_of(app)
    for _ in range(3):
        response = client.post(f"/cds-services/{SIGN}", json=flagged_call())
        assert response.status_code == 200 and len(response.get_json()["cards"]) == 1
    wait_for(lambda: store.writer.stats()["failedWrites"] >= 1, what="a failed audit write")
    # The writer may have tried while fewer calls were queued: how many were waiting then depends on timing.
    assert re.search(r"audit write failed \([123] records waiting", caplog.text)
    health = client.get("/health")
    assert health.status_code == 200
    body = health.get_json()
    assert body["status"] == "degraded"
    assert body["store"]["status"] == "unreachable" and body["store"]["audit"]["pending"] == 3
    assert body["store"]["audit"]["failedWrites"] >= 1 and body["store"]["error"]
    ready = client.get("/ready")
    assert ready.status_code == 503
    outcome = ready.get_json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "transient"
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-11-02T10:00:00Z"}]}
    stored = client.post(f"/cds-services/{SIGN}/feedback", json=feedback)
    assert stored.status_code == 503 and stored.get_json()["resourceType"] == "OperationOutcome"
    store.writer.close(timeout=0.5)
    assert "3 answered calls could not be written" in caplog.text


def test_records_queued_during_an_outage_are_written_once_it_ends(backend: str, tmp_path: Path) -> None:
    with temp_database(backend, tmp_path) as real_url, down_then_up(backend, tmp_path, real_url) as (url, bring_up):
        app = create_app({"AUTH": "off", "DATABASE_URL": url})
        client = app.test_client()
        store = store_of(app)
        sent = []
        for _ in range(5):
            body = flagged_call()
            sent.append(body["hookInstance"])
            assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
        wait_for(lambda: store.writer.stats()["failedWrites"] >= 1, what="a failed audit write")
        assert client.get("/ready").status_code == 503
        bring_up()
        assert store.writer.flush(30)
        assert client.get("/ready").status_code == 200
        health = client.get("/health").get_json()
        assert "status" not in health or health["status"] == "ok"
        assert health["store"]["status"] == "ok"
        assert sorted(r.hook_instance for r in calls(url)) == sorted(sent)
        store.close()


def test_a_full_queue_drops_and_counts(backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = store_for(unreachable_url(backend, tmp_path))
    store.writer.max_pending = 3
    for i in range(5):
        store.writer.record(CallRecord(service_id=SIGN, hook_instance=str(i)))
    stats = store.writer.stats()
    assert stats["dropped"] == 2 and stats["pending"] == 3
    assert "audit queue full" in caplog.text
    store.writer.close(timeout=0.2)


def test_health_and_ready_when_the_store_works(client: FlaskClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json()["status"] == "ok" and health.get_json()["store"]["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"


def test_the_callers_identity_is_audited_never_the_token(db_url: str, tmp_path: Path) -> None:
    key = ec_key()
    issuers = issuers_file(tmp_path / "issuers.json", [{"iss": EHR, "jwks": jwks(key)}])
    app = create_app({"AUTH": "jwt", "TRUSTED_ISSUERS": str(issuers), "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": db_url})
    client = app.test_client()
    payload = claims(SIGN_URL, tenant="clinic-7")
    signed = token(key, payload)
    assert client.post(f"/cds-services/{SIGN}", json=flagged_call(), headers=bearer(signed)).status_code == 200
    expired = token(key, claims(SIGN_URL, now=1_000_000_000))
    assert client.post(f"/cds-services/{SIGN}", json=flagged_call(), headers=bearer(expired)).status_code == 401
    services_of(app).store.close()
    ok, refused = calls(db_url)
    assert (ok.iss, ok.tenant, ok.jti, ok.status) == (EHR, "clinic-7", payload["jti"], 200)
    assert refused.status == 401 and refused.error.startswith("authentication failed") and refused.iss == EHR
    dump = repr([table_rows(db_url, table) for table in (audit_call,)])
    for tok in (signed, expired):
        assert tok not in dump and tok.split(".")[2] not in dump


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "postgresql"])
def test_a_hanging_database_does_not_hang_health_or_ready(backend: str) -> None:
    # A server that completes the TCP handshake and then says nothing (a dropped network path).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = make_url(PG_URL or "").set(host="127.0.0.1", port=silent.getsockname()[1])
        app = create_app({"AUTH": "off", "DATABASE_URL": url.render_as_string(hide_password=False)})
        client = app.test_client()
        assert client.post(f"/cds-services/{SIGN}", json=flagged_call()).status_code == 200
        health = client.get("/health")
        assert health.status_code == 200 and health.get_json()["status"] == "degraded"
        assert "did not answer" in health.get_json()["store"]["error"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and "did not answer" in ready.get_json()["issue"][0]["diagnostics"]
        services_of(app).store.writer.close(timeout=0.1)


def _loose_types(hint: object, seen: set[object]) -> list[str]:
    """Every dict or Any inside a type hint, following lists, tuples, unions and the dataclasses they name."""
    if hint is typing.Any:
        return ["Any"]
    origin = typing.get_origin(hint)
    if hint is dict or origin is dict:
        return [str(hint)]
    found: list[str] = []
    for arg in typing.get_args(hint):
        found += _loose_types(arg, seen)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and hint not in seen:
        seen.add(hint)
        for name, part in typing.get_type_hints(hint).items():
            found += [f"{hint.__name__}.{name}: {loose}" for loose in _loose_types(part, seen)]
    return found


def test_the_audit_record_is_typed_through_and_through() -> None:
    # Checked on a stand-in first, so the test can fail: a dict anywhere in a field's parts is found.
    assert _loose_types(list[dict[str, typing.Any]], set()) == ["dict[str, typing.Any]"]
    assert _loose_types(typing.Any, set()) == ["Any"]
    hints = typing.get_type_hints(CallRecord)
    assert {"orders", "cards", "system_actions"} <= set(hints)
    assert [f"{name}: {loose}" for name, hint in hints.items() for loose in _loose_types(hint, set())] == []
