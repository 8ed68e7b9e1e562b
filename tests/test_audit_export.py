"""`cds-service audit export --format fhir`: the audit log as FHIR R4 AuditEvents (IHE BALP style), validated with
fhir.resources, as NDJSON and PUT in batch Bundles to a FHIR stand-in, twice without duplicates."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.cli import main
from cds_service.runtime import services_of
from cds_service.store.audit_export import EVENT_NAMESPACE, batch_bundle
from cds_service.store.models import audit_call

from . import builders as b
from .conftest import SIGN
from .fhir_server import FhirBehaviour, fhir_server
from .store_support import flagged_call, plain_call, store_for, table_rows

PUBLIC_URL = "https://cds.example.org"
TOKEN = "audit-export-token-SECRET-2718"
OLD = datetime.now(UTC) - timedelta(days=40)


def record_calls(db_url: str) -> dict[str, dict[str, Any]]:
    """Through the real app: a flagged call, a plain call, a refused call (400); and one 40-day-old call. Returns
    the request bodies by kind."""
    app = create_app({"AUTH": "off", "DATABASE_URL": db_url, "PUBLIC_URL": PUBLIC_URL})
    client = app.test_client()
    flagged, plain = flagged_call(), plain_call("sr9")
    refused = b.hook_request("order-sign", [b.service_request("x", text="CBC")])
    del refused["context"]
    assert client.post(f"/cds-services/{SIGN}", json=flagged).status_code == 200
    assert client.post(f"/cds-services/{SIGN}", json=plain).status_code == 200
    assert client.post(f"/cds-services/{SIGN}", json=refused).status_code == 400
    store = services_of(app).store
    assert store.writer.flush(20)
    store.close()
    old = store_for(db_url)
    old.writer.record(CallRecord(service_id=SIGN, hook="order-sign", started_at=OLD, duration_ms=3.0))
    assert old.writer.flush(20)
    old.close()
    return {"flagged": flagged, "plain": plain, "refused": refused}


def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["audit", "export", "--format", "fhir", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def by_hook_instance(events: list[dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    found: dict[str | None, dict[str, Any]] = {}
    for event in events:
        ids = [
            e["what"]["identifier"]["value"]
            for e in event.get("entity", [])
            if e.get("type", {}).get("code") == "XrequestId"
        ]
        found[ids[0] if ids else None] = event
    return found


def test_ndjson_one_valid_audit_event_per_call_with_agents_entities_and_the_deciding_rule(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = record_calls(db_url)
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    monkeypatch.setenv("CDS_PUBLIC_URL", PUBLIC_URL)
    code, out, _ = export(capsys)
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 4
    for event in events:
        AuditEvent.model_validate(event)  # a valid FHIR R4 (R4B: unchanged) AuditEvent
    # The ids come from the call ids: the same call gives the same AuditEvent id, every time.
    call_ids = {row.call_id for row in table_rows(db_url, audit_call)}
    assert {e["id"] for e in events} == {str(uuid.uuid5(EVENT_NAMESPACE, c)) for c in call_ids}
    assert [e["period"]["start"] for e in events] == sorted(e["period"]["start"] for e in events)

    events_by = by_hook_instance(events)
    flagged = events_by[bodies["flagged"]["hookInstance"]]
    assert flagged["action"] == "E" and flagged["outcome"] == "0"
    assert flagged["subtype"][1]["code"] == "order-sign"
    assert flagged["source"]["observer"]["identifier"]["value"] == PUBLIC_URL
    assert flagged["source"]["site"] == SIGN
    roles = {a["type"]["coding"][0]["code"]: a for a in flagged["agent"]}
    assert set(roles) == {"110153", "110152", "IRCP"}
    assert roles["IRCP"]["who"] == {"identifier": {"value": "Practitioner/prac-1"}, "type": "Practitioner"}
    assert roles["IRCP"]["requestor"] is True
    assert roles["110152"]["network"] == {"address": "cds.example.org", "type": "1"}
    [patient] = [e for e in flagged["entity"] if e.get("role", {}).get("code") == "1"]
    assert patient["what"] == {"identifier": {"value": "pat-1"}, "type": "Patient"}
    [order] = [e for e in flagged["entity"] if e["type"]["code"] == "2"]
    assert order["what"] == {"identifier": {"value": "ServiceRequest/sr1"}, "type": "ServiceRequest"}
    details = {d["type"]: d["valueString"] for d in order["detail"]}
    assert details["verdict"] == "flagged"
    assert details["rule"] and details["rule"] != "(none)"
    assert details["policy"].startswith("dynamic-spinal-visualization|")

    plain = events_by[bodies["plain"]["hookInstance"]]
    [plain_order] = [e for e in plain["entity"] if e["type"]["code"] == "2"]
    assert {d["type"]: d["valueString"] for d in plain_order["detail"]}["verdict"] == "not-flagged"
    assert plain_order["what"]["identifier"]["value"] == "ServiceRequest/sr9"

    # The refused call: a minor failure with the reason; its hookInstance was read from the body.
    refused = events_by[bodies["refused"]["hookInstance"]]
    assert refused["outcome"] == "4"
    assert refused["outcomeDesc"].startswith("HTTP 400: ")
    assert not [e for e in refused["entity"] if e["type"]["code"] in ("1", "2")]

    # --since leaves the old call out; --until keeps only it.
    since = (OLD + timedelta(days=1)).date().isoformat()
    code, out, _ = export(capsys, "--since", since)
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = export(capsys, "--until", since)
    assert code == 0 and [json.loads(line)["period"]["start"][:10] for line in out.splitlines()] == [
        OLD.date().isoformat()
    ]


def test_posted_to_a_fhir_server_in_batch_bundles_twice_without_duplicates(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record_calls(db_url)
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    monkeypatch.setenv("CDS_AUDIT_EXPORT_TOKEN", TOKEN)
    with fhir_server(FhirBehaviour(token=TOKEN)) as (base, behaviour):
        code, out, err = export(capsys, "--to", base, "--allow-http", "--batch-size", "3")
        assert (code, err) == (0, "")
        assert out == f"4 AuditEvents sent to {base} in 2 batch Bundles: 4 created, 0 replaced\n"
        first = dict(behaviour.stored)
        assert len(first) == 4 and all(key.startswith("AuditEvent/") for key in first)
        assert [batch["entries"] for batch in behaviour.batches] == [3, 1]
        assert {batch["authorization"] for batch in behaviour.batches} == {f"Bearer {TOKEN}"}
        assert {batch["contentType"] for batch in behaviour.batches} == {"application/fhir+json"}
        assert {batch["path"] for batch in behaviour.batches} == {"/fhir"}

        # Again: every event replaced by id, none added.
        code, out, err = export(capsys, "--to", base, "--allow-http")
        assert (code, err) == (0, "")
        assert out.endswith("0 created, 4 replaced\n")
        assert behaviour.stored == first

        # The token from a file wins over the setting; a wrong one is refused and the export says so.
        token_file = tmp_path / "token"
        token_file.write_text("not-the-token-SECRET-1\n")
        code, out, err = export(capsys, "--to", base, "--allow-http", "--token-file", str(token_file))
        assert code == 1
        assert err.startswith(f"cds-service: export to {base} stopped: batch 1: the FHIR server answered 401")
        assert behaviour.batches[-1]["authorization"] == "Bearer not-the-token-SECRET-1"
    assert TOKEN not in out + err and "not-the-token" not in out + err


def test_the_stand_in_refuses_invalid_resources_and_a_failing_server_stops_the_export(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record_calls(db_url)
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    with fhir_server() as (base, behaviour):
        # The stand-in validates what it is sent, as a FHIR server does: an invalid AuditEvent is refused.
        broken = batch_bundle([{"resourceType": "AuditEvent", "id": "x", "action": "not-a-code"}])
        answer = requests.post(base, json=broken, timeout=10).json()
        assert answer["entry"][0]["response"]["status"] == "400 Bad Request"
        code, _, err = export(capsys, "--to", base, "--allow-http")
        assert (code, err) == (0, "")
        assert len(behaviour.stored) == 4
        Bundle.model_validate(batch_bundle(list(behaviour.stored.values())))
        behaviour.status = 503
        code, _, err = export(capsys, "--to", base, "--allow-http")
    assert code == 1 and err.startswith("cds-service: export to ") and "answered 503 (exception)" in err


def test_plain_http_needs_allow_http_and_the_url_must_be_a_base_url(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = export(capsys, "--to", "http://127.0.0.1:9/fhir")
    assert code == 2 and "unencrypted" in err
    code, _, err = export(capsys, "--to", "ftp://example.org/fhir")
    assert code == 2 and "base URL" in err
