"""GET /metrics in one process: exact counts after known calls and feedback, the switches, what labels never hold."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from cds_service import create_app
from cds_service.ops import metrics
from cds_service.ops.metrics import REFUSAL_LABELS, refusal_label
from cds_service.runtime import services_of

from . import builders as b
from .conftest import ROOT, SELECT, SIGN
from .fhir_server import FhirBehaviour, coverage, fhir_server
from .store_support import flagged_call, plain_call

POLICY = "dynamic-spinal-visualization"
REASONS = "https://cds.example.org/fhir/CodeSystem/dsv-override-reason"


def scrape(client: FlaskClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered(tmp_path: Path) -> Flask:
    application = create_app(
        {"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}", "ALLOW_HTTP_FHIR": True}
    )
    application.config["TESTING"] = True
    return application


def test_a_scrape_counts_known_calls_and_feedback_exactly(metered: Flask) -> None:
    client = metered.test_client()
    cards = []
    for body in (flagged_call("lumbar"), flagged_call("cervical"), flagged_call("lumbar"), plain_call(), plain_call()):
        response = client.post(f"/cds-services/{SIGN}", json=body)
        assert response.status_code == 200
        cards += response.get_json()["cards"]
    assert client.post(f"/cds-services/{SIGN}", json={"hook": "order-sign"}).status_code == 400
    select = b.hook_request("order-select", [b.service_request("x", text="CBC")])
    assert client.post(f"/cds-services/{SELECT}", json=select).status_code == 200
    assert client.post("/cds-services/no-such-service", json={}).status_code == 404  # not a service: not counted

    def override(card: dict[str, Any], code: str) -> dict[str, Any]:
        reason = {"reason": {"system": REASONS, "code": code, "display": code}}
        return {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-30T10:00:00Z"} | {
            "overrideReason": reason
        }

    accepted = {
        "card": cards[0]["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": cards[0]["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": "2026-11-30T10:00:00Z",
    }
    items = [accepted, override(cards[1], "not-dsv"), override(cards[2], "made-up-by-the-client")]
    assert client.post(f"/cds-services/{SIGN}/feedback", json={"feedback": items}).status_code == 200
    # The same items again are duplicates: stored once, counted once.
    assert client.post(f"/cds-services/{SIGN}/feedback", json={"feedback": items}).status_code == 200
    assert services_of(metered).store.writer.flush(10)

    s = scrape(client)
    calls = "cds_calls_total"
    assert value(s, calls, service=SIGN, hook="order-sign", status="200") == 5
    assert value(s, calls, service=SIGN, hook="order-sign", status="400") == 1
    assert value(s, calls, service=SELECT, hook="order-select", status="200") == 1
    assert sum(v for (name, _), v in s.items() if name == calls) == 7
    assert value(s, "cds_call_duration_seconds_count", service=SIGN, hook="order-sign") == 6
    assert value(s, "cds_call_duration_seconds_bucket", service=SIGN, hook="order-sign", le="+Inf") == 6
    flagged = {labels: v for (name, labels), v in s.items() if name == "cds_orders_total"}
    assert sum(v for labels, v in flagged.items() if ("verdict", "flagged") in labels) == 3
    assert sum(v for labels, v in flagged.items() if ("verdict", "not-flagged") in labels) == 3
    assert all(dict(labels)["policy"] == POLICY and dict(labels)["rule"] for labels in flagged)
    assert value(s, "cds_cards_total") == 3
    assert value(s, "cds_feedback_total", outcome="accepted", reason="none") == 1
    assert value(s, "cds_feedback_total", outcome="overridden", reason="not-dsv") == 1
    # A reason code the policy does not list is "other": clients cannot grow the label set.
    assert value(s, "cds_feedback_total", outcome="overridden", reason="other") == 1
    assert value(s, "cds_audit_records_total", state="written") == 7
    assert value(s, "cds_audit_records_total", state="failed") == 0
    assert value(s, "cds_audit_queue_depth") == 0
    [info] = [dict(labels) for (name, labels), v in s.items() if name == "cds_policy_info" and v == 1]
    policy = services_of(metered).runtime.policies.policies[0]
    assert info == {"policy": policy.id, "version": policy.version, "sha256": policy.sha256}
    assert value(s, "cds_policy_last_reload_ok") == 1
    assert value(s, "cds_policy_load_duration_seconds") > 0


def test_fhir_reads_are_counted_by_outcome(metered: Flask) -> None:
    client = metered.test_client()
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")])) as (base, _):
        assert client.post(f"/cds-services/{SIGN}", json=flagged_call() | {"fhirServer": base}).status_code == 200
    with fhir_server(FhirBehaviour(status=500)) as (base, _):
        assert client.post(f"/cds-services/{SIGN}", json=flagged_call() | {"fhirServer": base}).status_code == 200
    s = scrape(client)
    assert value(s, "cds_fhir_reads_total", outcome="ok") == 1
    assert value(s, "cds_fhir_reads_total", outcome="error") == 1
    assert value(s, "cds_fhir_read_duration_seconds_count", outcome="ok") == 1


def test_no_token_patient_or_user_id_in_any_label(metered: Flask) -> None:
    client = metered.test_client()
    body = flagged_call()
    body["context"] |= {"patientId": "pat-secret-4711", "userId": "Practitioner/user-secret-0815"}
    body["fhirAuthorization"] = {"access_token": "token-secret-42", "token_type": "Bearer", "expires_in": 60}
    body["fhirAuthorization"] |= {"scope": "patient/Coverage.read", "subject": "cds"}
    assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    for secret in ("pat-secret-4711", "user-secret-0815", "token-secret-42", body["hookInstance"]):
        assert secret not in text


def test_jwt_refusals_are_counted_by_a_fixed_reason(tmp_path: Path) -> None:
    app = create_app({"AUTH": "jwt", "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})
    client = app.test_client()
    for headers in ({}, {"Authorization": "Basic dXNlcg=="}, {"Authorization": "Bearer not.a.jwt"}):
        assert client.post(f"/cds-services/{SIGN}", json=flagged_call(), headers=headers).status_code == 401
    assert client.post(f"/cds-services/{SIGN}/feedback", json={"feedback": []}).status_code == 401
    s = scrape(client)
    assert value(s, "cds_jwt_refusals_total", reason="no-token") == 2
    assert value(s, "cds_jwt_refusals_total", reason="not-bearer") == 1
    assert value(s, "cds_jwt_refusals_total", reason="malformed") == 1
    assert value(s, "cds_calls_total", service=SIGN, hook="order-sign", status="401") == 3


def test_every_refusal_reason_in_auth_has_a_stable_label() -> None:
    source = (ROOT / "cds_service" / "auth" / "tokens.py").read_text()
    reasons = re.findall(r'AuthError\(\s*f?"([^"]+)"', source)
    assert len(reasons) > 20
    for reason in reasons:
        assert refusal_label(reason) in REFUSAL_LABELS - {"other"}, reason
    assert refusal_label("something new") == "other"


def test_metrics_off_is_a_404(tmp_path: Path) -> None:
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}", "METRICS": "off"})
    response = app.test_client().get("/metrics")
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_a_metrics_token_is_required_when_set(tmp_path: Path) -> None:
    app = create_app(
        {"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}", "METRICS_TOKEN": "scrape-me"}
    )
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-me"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["resourceType"] == "OperationOutcome"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "cds_calls_total" in client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).get_data(
        as_text=True
    )


def test_the_hooks_for_breakers_and_the_spill_file_count_when_on_and_do_nothing_when_off(tmp_path: Path) -> None:
    # The circuit breaker (fhir_client) and the audit spill file call these; they must never raise.
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'a.sqlite3'}"})
    metrics.breaker_state("https://ehr.example.org:443/fhir", "open")
    metrics.breaker_state("https://ehr.example.org:443/fhir", "half-open")
    metrics.breaker_state("https://other.example.org:443/fhir", "closed")
    metrics.audit_queued()
    metrics.audit_queued()
    metrics.audit_spilled(2)
    metrics.audit_written(2, from_spill=True)
    s = scrape(app.test_client())
    server = "https://ehr.example.org:443/fhir"
    assert value(s, "cds_fhir_breaker_state", server=server, state="half-open") == 1
    assert ("cds_fhir_breaker_state", (("server", server), ("state", "open"))) not in s  # 0: left out
    assert value(s, "cds_fhir_breaker_state", server="https://other.example.org:443/fhir", state="closed") == 1
    assert value(s, "cds_audit_records_total", state="spilled") == 2
    assert value(s, "cds_audit_records_total", state="written") == 2
    assert value(s, "cds_audit_queue_depth") == 0

    create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'b.sqlite3'}", "METRICS": "off"})
    assert metrics.current() is None
    metrics.breaker_state("https://ehr.example.org:443/fhir", "open")
    metrics.audit_spilled(1)
