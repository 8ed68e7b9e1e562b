"""The engine is general: a second policy (carotid intima-media thickness), written only as data, beside the shipped
one: check-policy, discovery, one card per policy, and --explain naming its rules, with no code change."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.engine import Policy, judge, load_policies, read_order
from cds_service.engine.examples import run_examples

from .builders import CPT, hook_request, service_request
from .conftest import ROOT
from .process_support import cds_service_command

SECOND = ROOT / "tests" / "policies" / "second"
SHIPPED = ROOT / "policies"
CIMT = "carotid-intima-media-thickness"
DSV = "dynamic-spinal-visualization"
SERVICES = {
    "dsv-order-select",
    "dsv-order-sign",
    "dsv-order-dispatch",
    "dsv-appointment-book",
    "dsv-encounter-start",
    "cimt-order-select",
    "cimt-order-sign",
}
CIMT_SUMMARY = (
    "Carotid intima-media thickness (CIMT) testing is investigational and not covered; use a risk calculator instead"
)
CIMT_URL = (
    "https://www.bcbsms.com/policy-search/medical/policy-detail/"
    "ultrasonographic-measurement-of-carotid-intimalmedial-thickness-as-an-assessment-of-subclinical-atherosclerosis"
)


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One policy folder holding the shipped policy and the second one, with the labelled examples of both."""
    folder = tmp_path_factory.mktemp("both")
    (folder / "examples").mkdir()
    shutil.copy(SHIPPED / f"{DSV}.yaml", folder)
    shutil.copy(SECOND / f"{CIMT}.yaml", folder)
    for examples in [*(SHIPPED / "examples").glob("*.json"), *(SECOND / "examples").glob("*.json")]:
        shutil.copy(examples, folder / "examples")
    return folder


@cache
def cimt_policy() -> Policy:
    [policy] = load_policies(SECOND).policies
    return policy


def examples() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted((SECOND / "examples").glob("*.json")):
        records += json.loads(path.read_text(encoding="utf-8"))
    return records


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cds_service_command(), *args], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )


def cimt_order(rid: str = "cimt-a") -> dict[str, Any]:
    return service_request(rid, text="Carotid intima-media thickness ultrasound")


def dsv_order(rid: str = "dsv-a") -> dict[str, Any]:
    return service_request(rid, text="Digital motion x-ray cervical spine")


# --- the second policy's own examples -----------------------------------------------------------------------------


def test_the_second_policys_examples_are_well_formed_and_its_own() -> None:
    records = examples()
    assert len(records) >= 20
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for record in records:
        assert record["policy"] == CIMT, record["id"]
        assert record["resource"]["resourceType"] == "ServiceRequest" and record["resource"]["id"] == record["id"]
        assert record["why"].strip(), record["id"]
    labels = Counter(r["label"] for r in records)
    assert set(labels) == {"flagged", "not-flagged"} and min(labels.values()) >= 10, labels


def test_the_examples_exercise_every_rule_of_the_second_decision_table() -> None:
    policies = load_policies(SECOND)
    report = run_examples(policies, SECOND / "examples")
    assert report.problems == [] and report.misjudged == []
    assert (report.precision, report.recall) == (1.0, 1.0)
    used = {v.rule for judged in report.judged for v in judged.verdicts}
    assert used == {rule.id for rule in cimt_policy().rules}


@pytest.mark.parametrize(
    ("resource", "rule", "flagged"),
    [
        # The CIMT billing codes name the study itself: no anatomy needed (the spine policy's codes do need it).
        (service_request(cpt="93895"), "cimt-billing-code", True),
        # IMT needs carotid evidence; the body-site-only word "neck" gives it.
        (service_request(text="IMT ultrasound", body_site="Neck"), "imt-on-carotid", True),
        (service_request(text="IMT ultrasound", note=[{"text": "neck"}]), "imt-without-carotid", False),
        # The covered duplex, by code or by its reason.
        (service_request(cpt="93880", text="Carotid duplex"), "cimt-other-study-named", False),
        (
            service_request(text="Carotid ultrasound for risk stratification", reasonCode=[{"text": "Carotid bruit"}]),
            "cimt-other-study",
            False,
        ),
        (service_request(text="Carotid ultrasound for risk stratification"), "imt-on-carotid", True),
    ],
    ids=["billing-code", "neck-body-site", "neck-in-note", "duplex-code", "bruit-reason", "risk-screening"],
)
def test_the_second_policy_decides_by_its_own_table(resource: dict[str, Any], rule: str, flagged: bool) -> None:
    verdict = judge(read_order(resource), cimt_policy())
    assert (verdict.rule, verdict.flagged) == (rule, flagged)


def test_a_flagged_cimt_order_names_its_billing_code_and_no_region() -> None:
    verdict = judge(read_order(service_request(cpt="93895")), cimt_policy())
    assert verdict.reason == "a billing code of the CIMT study"
    assert verdict.billing_code is not None and (verdict.billing_code.system, verdict.billing_code.code) == (
        CPT,
        "93895",
    )
    # No region has an alternative: the card offers removal only.
    assert verdict.region is None and cimt_policy().alternatives == {}


def test_each_policy_flags_only_its_own_service(both: Path) -> None:
    policies = {p.id: p for p in load_policies(both).policies}
    cimt, dsv = read_order(cimt_order()), read_order(dsv_order())
    assert judge(cimt, policies[CIMT]).flagged and not judge(dsv, policies[CIMT]).flagged
    assert judge(dsv, policies[DSV]).flagged and not judge(cimt, policies[DSV]).flagged


# --- beside the shipped policy: check-policy, discovery, hooks, evaluate ----------------------------------------------


@pytest.mark.slow
def test_check_policy_passes_on_the_second_policy_alone() -> None:
    result = run_cli("check-policy", str(SECOND))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{CIMT} 2026.1.0" in result.stdout and "11 rules, alternatives for none" in result.stdout
    assert "examples: 25 (12 to flag, 13 not); precision 1.000, recall 1.000" in result.stdout


@pytest.mark.slow
def test_check_policy_passes_on_both_policies_and_both_sets_of_examples(both: Path) -> None:
    result = run_cli("check-policy", str(both))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"ok  {both / (CIMT + '.yaml')}: {CIMT} 2026.1.0" in out
    assert f"ok  {both / (DSV + '.yaml')}: {DSV} " in out
    for service in SERVICES:
        assert f"service {service} on " in out
    # The shipped examples carry no policy id and are judged by both policies: the second flags none of them.
    total = sum(len(json.loads(p.read_text(encoding="utf-8"))) for p in (both / "examples").glob("*.json"))
    assert f"examples: {total} (" in out and "precision 1.000, recall 1.000" in out


@pytest.fixture
def both_client(both: Path, tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app({"POLICY_DIR": str(both), "AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})
    app.config["TESTING"] = True
    yield app.test_client()


def test_discovery_lists_the_services_of_both_policies(both_client: FlaskClient) -> None:
    response = both_client.get("/cds-services")
    assert response.status_code == 200
    services = {s["id"]: s for s in response.get_json()["services"]}
    assert set(services) == SERVICES
    assert services["cimt-order-sign"]["hook"] == "order-sign"
    assert services["cimt-order-select"]["hook"] == "order-select"
    assert services["cimt-order-sign"]["title"] == "Carotid intima-media thickness check (order sign)"
    assert "policy 2.02.16" in services["cimt-order-sign"]["description"]
    assert "policy 2.02.16" not in services["dsv-order-sign"]["description"]


@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
def test_a_hook_call_gets_exactly_one_card_from_each_policy(both_client: FlaskClient, hook: str) -> None:
    lab = service_request("lab-1", text="Lipid panel", category=[{"text": "Laboratory"}])
    body = hook_request(hook, [dsv_order(), cimt_order(), lab])
    cards: dict[str, dict[str, Any]] = {}
    for prefix in ("dsv", "cimt"):
        response = both_client.post(f"/cds-services/{prefix}-{hook}", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        [cards[prefix]] = response.get_json()["cards"]
    cimt, dsv = cards["cimt"], cards["dsv"]
    assert cimt["summary"] == CIMT_SUMMARY and cimt["source"]["url"] == CIMT_URL
    assert cimt["extension"]["davinci-crd.associated-resource"] == [{"reference": "ServiceRequest/cimt-a"}]
    assert "Not a CIMT study? Override" in cimt["detail"]
    assert [r["code"] for r in cimt["overrideReasons"]] == ["research-study", "not-cimt"]
    # No alternative order exists for CIMT: removal only.
    # No alternative for CIMT: an External Reference card (links, no suggestions).
    assert "suggestions" not in cimt and cimt["links"]
    assert dsv["extension"]["davinci-crd.associated-resource"] == [{"reference": "ServiceRequest/dsv-a"}]
    assert dsv["summary"] != CIMT_SUMMARY and dsv["source"]["url"] != CIMT_URL
    assert "6.01.46" in dsv["detail"] and "2.02.16" not in dsv["detail"]


@pytest.mark.slow
def test_evaluate_explain_names_the_second_policys_rules(both: Path, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps(hook_request("order-sign", [dsv_order(), cimt_order()])), encoding="utf-8")
    result = run_cli("evaluate", "--explain", "--policy-dir", str(both), "--service", "cimt-order-sign", str(request))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"ServiceRequest/cimt-a: FLAGGED by {CIMT} 2026.1.0, rule cimt-named-in-order" in out
    assert "  reason:  the order names carotid intima-media thickness" in out
    assert f"ServiceRequest/dsv-a: not flagged by {CIMT} 2026.1.0, rule cimt-no-evidence" in out
    assert DSV not in out
    spine = run_cli("evaluate", "--explain", "--policy-dir", str(both), "--service", "dsv-order-sign", str(request))
    assert spine.returncode == 0, spine.stderr
    assert f"ServiceRequest/dsv-a: FLAGGED by {DSV} " in spine.stdout and CIMT not in spine.stdout
