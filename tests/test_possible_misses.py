"""Possible misses: not-flagged orders decided by a rule marked `review: true`, from real calls through the app into a
real store (SQLite and PostgreSQL), in the report (JSON, text, CSV, HTML) and exported as labelled examples."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.cli import main
from cds_service.engine import load_policies
from cds_service.engine.examples import judge_examples, load_examples
from cds_service.runtime import services_of
from cds_service.store.report import build_report, render_csv, render_text

from .builders import CPT, hook_request, service_request
from .conftest import ROOT
from .process_support import cds_service_command
from .store_support import store_for, verdict_record

SYNTHETIC = ROOT / "tests" / "policies" / "engine-test"
SIGN, SELECT = "test-order-sign", "test-order-select"
POLICY = "engine-test"
# Identifiers that must never reach the possible misses (patient, practitioner, encounter, the order's own id).
SECRETS = ("pat-secret-41", "prac-secret-42", "enc-secret-43", "order-secret-44")


def order(rid: str, **kwargs: Any) -> dict[str, Any]:
    resource = service_request(rid, **kwargs)
    resource |= {
        "subject": {"reference": f"Patient/{SECRETS[0]}"},
        "requester": {"reference": f"Practitioner/{SECRETS[1]}"},
        "encounter": {"reference": f"Encounter/{SECRETS[2]}"},
    }
    return resource


def call(hook: str, resource: dict[str, Any]) -> dict[str, Any]:
    body = hook_request(hook, [resource])
    body["context"] |= {"patientId": SECRETS[0], "userId": f"Practitioner/{SECRETS[1]}", "encounterId": SECRETS[2]}
    return body


@pytest.fixture
def judged_app(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The app on the synthetic policy, after real calls: two possible misses (one judged at select and sign), one
    flagged order and one order with no evidence."""
    monkeypatch.setenv("CDS_POLICY_DIR", str(SYNTHETIC))
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    app = create_app({"AUTH": "off", "DATABASE_URL": db_url, "POLICY_DIR": str(SYNTHETIC)})
    client = app.test_client()
    cine = order(f"{SECRETS[3]}-1", text="Cine study")  # a shared technique word, no limb: technique-without-limb
    unlisted = order(f"{SECRETS[3]}-2", text="Unlisted procedure", cpt="76499")  # billing-code-alone
    calls = [
        (SELECT, "order-select", cine),
        (SIGN, "order-sign", cine),
        (SIGN, "order-sign", unlisted),
        (SIGN, "order-sign", order(f"{SECRETS[3]}-3", text="Zeta scan of the arm")),  # flagged
        (SIGN, "order-sign", order(f"{SECRETS[3]}-4", text="Complete blood count")),  # no evidence
    ]
    for service, hook, resource in calls:
        response = client.post(f"/cds-services/{service}", json=call(hook, resource))
        assert response.status_code == 200, response.get_json()
    assert services_of(app).store.writer.flush(20)
    return app


def test_the_report_counts_possible_misses_by_rule_and_names_the_orders(judged_app: Flask) -> None:
    store = services_of(judged_app).store
    built = build_report(store.db)
    report = built.to_json()
    misses = report["possibleMisses"]
    assert report["orders"]["judged"] == 5 and report["orders"]["flagged"] == 1
    assert misses["total"] == 3
    assert [(r["rule"], r["orders"]) for r in misses["byRule"]] == [
        ("technique-without-limb", 2),
        ("billing-code-alone", 1),
    ]
    assert [(m["orderName"], m["rule"], m["count"]) for m in misses["orders"]] == [
        ("Cine study", "technique-without-limb", 2),
        ("Unlisted procedure", "billing-code-alone", 1),
    ]
    assert misses["orders"][1]["codes"][0]["code"] == "76499"
    text = render_text(built)
    assert "Possible misses: not flagged by a rule marked for review (3)" in text
    assert "technique-without-limb" in text and "Cine study" in text
    rows = list(csv.reader(io.StringIO(render_csv(built))))
    assert ["possible misses", "by rule", f"{POLICY} 1.2.3 technique-without-limb", "2"] in rows
    for rendered in (json.dumps(misses), text.split("Possible misses")[1].split("Errors by status")[0]):
        assert not any(secret in rendered for secret in SECRETS)
    store.close()


def test_the_html_report_shows_the_possible_misses_section(judged_app: Flask, db_url: str) -> None:
    if importlib.util.find_spec("pygal") is None:  # not imported here: see below
        pytest.skip("the extra 'report' (pygal) is not installed")
    services_of(judged_app).store.close()
    # The real command in its own process (pygal, once imported, hooks every later import of the test process).
    env = {**os.environ, "CDS_DATABASE_URL": db_url, "CDS_POLICY_DIR": str(SYNTHETIC)}
    result = subprocess.run(
        [*cds_service_command(), "report", "--format", "html"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    page = result.stdout
    section = page.split('<section id="possible-misses-section">')[1].split("</section>")[0]
    assert 'data-json="possibleMisses.byRule.0.orders">2<' in section
    assert "Cine study" in section and "Unlisted procedure" in section
    assert not any(secret in section for secret in SECRETS)
    assert 'data-json="possibleMisses.total">3<' in page


def test_the_export_is_labelled_examples_that_judge_as_the_live_calls_did(
    judged_app: Flask, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    services_of(judged_app).store.close()
    assert main(["report", "--possible-misses", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert not any(secret in out for secret in SECRETS)
    examples = json.loads(out)
    assert [(e["label"], e["policy"], e["resource"]["code"]["text"]) for e in examples] == [
        ("", POLICY, "Cine study"),
        ("", POLICY, "Unlisted procedure"),
    ]
    for example in examples:
        assert set(example) == {"id", "label", "why", "policy", "resource"}
        assert example["resource"]["id"] == example["id"] and example["id"].startswith("possible-miss-")
        assert not {"subject", "encounter", "requester"} & set(example["resource"])
    # The billing code comes back from the evidence the audit kept, with the policy's system and display.
    assert examples[1]["resource"]["code"]["coding"] == [
        {"system": CPT, "code": "76499", "display": "Unlisted diagnostic radiographic procedure"}
    ]
    assert "rule technique-without-limb" in examples[0]["why"] and "2 time(s)" in examples[0]["why"]
    # Unlabelled, they are refused as examples; labelled, they judge as the live calls did.
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "misses.json").write_text(json.dumps(examples), encoding="utf-8")
    policies = load_policies(SYNTHETIC)
    loaded, problems = load_examples(folder, policies)
    assert loaded == [] and len(problems) == 2 and all("label ''" in str(p) for p in problems)
    for example in examples:
        example["label"] = "not-flagged"
    (folder / "misses.json").write_text(json.dumps(examples), encoding="utf-8")
    loaded, problems = load_examples(folder, policies)
    assert problems == []
    assert [(j.verdicts[0].rule, j.correct) for j in judge_examples(loaded, policies)] == [
        ("technique-without-limb", True),
        ("billing-code-alone", True),
    ]


def test_possible_misses_need_the_json_format(judged_app: Flask, capsys: pytest.CaptureFixture[str]) -> None:
    services_of(judged_app).store.close()
    assert main(["report", "--possible-misses"]) == 2
    assert "--format json" in capsys.readouterr().err


def test_records_written_before_the_mark_was_kept_count_by_the_policys_marks(db_url: str) -> None:
    store = store_for(db_url)
    store.upgrade()
    stored = {
        "v": 2,
        "order": "ServiceRequest/o1",
        "orderName": "Cine study",
        "policy": POLICY,
        "policyVersion": "1.2.2",
        "verdict": "not-flagged",
        "rule": "technique-without-limb",
        "reason": "names the technique but nothing says the study is of a limb",
        "deciding": [],
        "evidenceFor": [],
        "evidenceAgainst": [],
    }
    store.writer.record(CallRecord(service_id=SIGN, hook="order-sign", orders=[verdict_record(stored)]))
    assert store.writer.flush(20)
    assert build_report(store.db).to_json()["possibleMisses"]["total"] == 0
    [policy] = load_policies(SYNTHETIC).policies
    marked = {policy.id: frozenset(r.id for r in policy.rules if r.review)}
    misses = build_report(store.db, review_rules=marked).to_json()["possibleMisses"]
    assert misses["total"] == 1 and misses["orders"][0]["versions"] == ["1.2.2"]
    store.close()
