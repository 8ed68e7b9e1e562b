"""Da Vinci CRD: coverage-information systemActions, prefetch states, reading the FHIR server, configuration."""

from __future__ import annotations

import copy
import logging
import socket
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.engine.crd import COVERAGE_INFO_URL

from . import builders as b
from .conftest import ROOT, SELECT, SIGN
from .fhir_server import FhirBehaviour, coverage, fhir_server

CERVICAL = ("122494005", "Cervical spine")
TOKEN = "secret-access-token-9f8e7d"


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app(
        {
            "AUTH": "off",
            "ALLOW_HTTP_FHIR": True,
            "FHIR_TIMEOUT": 1.0,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'crd.sqlite3'}",
        }
    )


def dsv(rid: str = "dsv1", **fields: Any) -> dict[str, Any]:
    order = b.service_request(rid, cpt="76496", text="Unlisted fluoroscopic procedure", body_site=CERVICAL, **fields)
    order["identifier"] = [{"system": "urn:oid:1.2.3.4", "value": f"ord-{rid}"}]
    order["extension"] = [{"url": "http://example.org/fhir/StructureDefinition/local-flag", "valueBoolean": True}]
    return order


def sign(client: FlaskClient, orders: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    response = client.post(f"/cds-services/{SIGN}", json=b.hook_request("order-sign", orders, **extra))
    assert response.status_code == 200, response.get_data(as_text=True)
    answer: dict[str, Any] = response.get_json()
    return answer


def coverage_extension(resource: dict[str, Any]) -> dict[str, Any]:
    [ext] = [e for e in resource["extension"] if e["url"] == COVERAGE_INFO_URL]
    return {part["url"]: part for part in ext["extension"]}


# --- the systemAction ------------------------------------------------------------------------------------------


def test_flagged_order_with_prefetched_coverage_gets_a_coverage_assertion(client: FlaskClient) -> None:
    order = dsv()
    data = sign(
        client,
        [order, b.medication_request(), b.service_request("lab", text="CBC")],
        prefetch={"coverage": coverage("cov-1")},
    )
    [action] = data["systemActions"]
    assert action["type"] == "update" and action["description"]
    resource = action["resource"]
    # The client's own order, unchanged but for one added extension.
    added = [e for e in resource["extension"] if e not in order["extension"]]
    assert len(added) == 1 and added[0]["url"] == COVERAGE_INFO_URL
    assert {k: v for k, v in resource.items() if k != "extension"} == {
        k: v for k, v in order.items() if k != "extension"
    }
    assert resource["extension"][: len(order["extension"])] == order["extension"]
    parts = coverage_extension(resource)
    # CRD ext-coverage-information: coverage, covered, date and coverage-assertion-id are required.
    assert parts["coverage"]["valueReference"] == {"reference": "Coverage/cov-1"}
    assert parts["covered"]["valueCode"] == "not-covered"
    assert parts["billingCode"]["valueCoding"] == {"system": "http://www.ama-assn.org/go/cpt", "code": "76496"}
    assert "nvestigational" in parts["reason"]["valueCodeableConcept"]["text"]
    assert "6.01.46" in parts["reason"]["valueCodeableConcept"]["text"]
    assert parts["date"]["valueDate"] == date.today().isoformat()
    assert len(parts["coverage-assertion-id"]["valueString"]) >= 16
    assert "pa-needed" not in parts  # CRD 2.1+: not with not-covered
    assert set(parts) <= {"coverage", "covered", "billingCode", "reason", "date", "coverage-assertion-id"}
    # The card still goes out beside it.
    assert len(data["cards"]) == 1


def test_each_flagged_order_gets_its_own_assertion_and_unflagged_ones_none(client: FlaskClient) -> None:
    orders = [dsv("a"), b.service_request("x", text="MRI lumbar spine"), dsv("b")]
    data = sign(client, orders, prefetch={"coverage": coverage("cov-1")})
    assert [a["resource"]["id"] for a in data["systemActions"]] == ["a", "b"]
    ids = {coverage_extension(a["resource"])["coverage-assertion-id"]["valueString"] for a in data["systemActions"]}
    assert len(ids) == 2


def test_deep_but_accepted_order_is_echoed_whole(client: FlaskClient) -> None:
    # Accepted bodies nest at most 254 levels, so whatever is read can be sent back: no second, shallower limit.
    deep: Any = {}
    for _ in range(200):
        deep = {"x": deep}
    order = dsv(note=[{"text": "x", "extension": [{"url": "http://example.org/deep", "valueString": "y"}]}])
    order["modifierExtension"] = [{"url": "http://example.org/deep", "x": deep}]
    [action] = sign(client, [order], prefetch={"coverage": coverage("cov-1")})["systemActions"]
    assert action["resource"]["modifierExtension"] == order["modifierExtension"]


def test_order_without_a_cpt_code_has_no_billing_code(client: FlaskClient) -> None:
    order = b.service_request("t", text="Digital motion x-ray cervical spine")
    [action] = sign(client, [order], prefetch={"coverage": coverage("cov-1")})["systemActions"]
    assert "billingCode" not in coverage_extension(action["resource"])
    assert action["resource"]["extension"][0]["url"] == COVERAGE_INFO_URL


def test_assertion_is_not_resent_when_the_order_already_carries_it(client: FlaskClient) -> None:
    first = sign(client, [dsv()], prefetch={"coverage": coverage("cov-1")})
    annotated = first["systemActions"][0]["resource"]
    again = sign(client, [copy.deepcopy(annotated)], prefetch={"coverage": coverage("cov-1")})
    assert again["systemActions"] == [] and len(again["cards"]) == 1
    # A different Coverage is a different assertion.
    other = sign(client, [copy.deepcopy(annotated)], prefetch={"coverage": coverage("cov-2")})
    assert len(other["systemActions"]) == 1


def test_order_select_asserts_only_for_selected_orders(client: FlaskClient) -> None:
    body = b.hook_request(
        "order-select", [dsv("a"), dsv("b")], selections=["ServiceRequest/b"], prefetch={"coverage": coverage("cov-1")}
    )
    data = client.post(f"/cds-services/{SELECT}", json=body).get_json()
    assert [a["resource"]["id"] for a in data["systemActions"]] == ["b"]


# --- prefetch states -------------------------------------------------------------------------------------------


def test_prefetch_null_means_no_coverage_and_no_read(client: FlaskClient) -> None:
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")])) as (base, behaviour):
        data = sign(client, [dsv()], prefetch={"coverage": None}, fhirServer=base)
    assert data["systemActions"] == [] and len(data["cards"]) == 1
    assert behaviour.requests == []


def test_prefetch_bundle_with_several_active_takes_the_first_by_order(client: FlaskClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": coverage("secondary", order=2)},
            {"resource": coverage("old", status="cancelled", order=0)},
            {"resource": coverage("primary", order=1)},
        ],
    }
    [action] = sign(client, [dsv()], prefetch={"coverage": bundle})["systemActions"]
    assert coverage_extension(action["resource"])["coverage"]["valueReference"]["reference"] == "Coverage/primary"


def test_prefetch_bundle_with_no_active_coverage_gives_none(client: FlaskClient) -> None:
    bundle = {"resourceType": "Bundle", "entry": [{"resource": coverage("old", status="cancelled")}]}
    assert sign(client, [dsv()], prefetch={"coverage": bundle})["systemActions"] == []


def test_prefetch_operation_outcome_is_unknown_and_the_server_is_read(client: FlaskClient) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-9")])) as (base, behaviour):
        data = sign(client, [dsv()], prefetch={"coverage": outcome}, fhirServer=base)
    assert len(behaviour.requests) == 1
    assert coverage_extension(data["systemActions"][0]["resource"])["coverage"]["valueReference"] == {
        "reference": "Coverage/cov-9"
    }


def test_absent_prefetch_reads_the_fhir_server_with_the_bearer_token(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = {
        "access_token": TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Coverage.read",
        "subject": "cds-service",
    }
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-5")], token=TOKEN)) as (base, behaviour):
        data = sign(client, [dsv(), b.medication_request()], fhirServer=base, fhirAuthorization=auth)
    [request] = behaviour.requests
    assert request["path"] == "/fhir/Coverage"
    assert request["query"] == {"patient": ["pat-1"], "status": ["active"]}
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert len(data["systemActions"]) == 1
    assert TOKEN not in caplog.text


def test_no_read_when_nothing_is_flagged(client: FlaskClient) -> None:
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")])) as (base, behaviour):
        data = sign(client, [b.medication_request(), b.service_request("x", text="CBC")], fhirServer=base)
    assert data == {"cards": [], "systemActions": []}
    assert behaviour.requests == []


def test_paginated_search_is_followed(client: FlaskClient) -> None:
    coverages = [coverage(f"old-{i}", status="cancelled") for i in range(3)] + [coverage("current")]
    with fhir_server(FhirBehaviour(coverages=coverages, page_size=2)) as (base, behaviour):
        data = sign(client, [dsv()], fhirServer=base)
    assert len(behaviour.requests) == 2
    assert coverage_extension(data["systemActions"][0]["resource"])["coverage"]["valueReference"] == {
        "reference": "Coverage/current"
    }


@pytest.mark.parametrize(
    "behaviour", [FhirBehaviour(status=500), FhirBehaviour(token="other"), FhirBehaviour(coverages=[])]
)
def test_failing_server_gives_cards_without_assertion(
    client: FlaskClient, behaviour: FhirBehaviour, caplog: pytest.LogCaptureFixture
) -> None:
    behaviour.coverages = behaviour.coverages or []
    auth = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "x", "subject": "y"}
    with fhir_server(behaviour) as (base, seen):
        data = sign(client, [dsv()], fhirServer=base, fhirAuthorization=auth)
    assert len(seen.requests) == 1
    assert len(data["cards"]) == 1 and data["systemActions"] == []
    assert TOKEN not in caplog.text


def test_slow_server_is_abandoned_at_the_timeout(client: FlaskClient) -> None:
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], delay=4.0)) as (base, _):
        started = time.monotonic()
        data = sign(client, [dsv()], fhirServer=base)
        elapsed = time.monotonic() - started
    # FHIR_TIMEOUT is 1 s here; the server would take 4 s.
    assert elapsed < 3.0
    assert len(data["cards"]) == 1 and data["systemActions"] == []


def test_unreachable_server_gives_cards_without_assertion(client: FlaskClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = sign(client, [dsv()], fhirServer=f"http://127.0.0.1:{port}/fhir")
    assert len(data["cards"]) == 1 and data["systemActions"] == []


def test_plain_http_and_other_schemes_are_refused_unless_allowed(tmp_path: Path) -> None:
    strict = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}"}).test_client()
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")])) as (base, behaviour):
        data = sign(strict, [dsv()], fhirServer=base)
        assert data["systemActions"] == [] and behaviour.requests == []
        data = sign(strict, [dsv()], fhirServer="file:///etc/passwd")
        assert data["systemActions"] == [] and len(data["cards"]) == 1


# --- configuration ---------------------------------------------------------------------------------------------


def test_discovery_lists_crd_configuration_options_and_versions(client: FlaskClient) -> None:
    for service in client.get("/cds-services").get_json()["services"]:
        options = {o["code"]: o for o in service["extension"]["davinci-crd.configuration-options"]}
        assert options["coverage-info"]["type"] == "boolean" and options["coverage-info"]["default"] is True
        assert options["max-cards"]["type"] == "integer"
        # CRD dev-5: a boolean per card type returned; the Instructions card is off unless the EHR asks.
        assert options["therapy-alternatives-opt"]["default"] is True and options["guideline"]["default"] is True
        assert options["instructions"]["type"] == "boolean" and options["instructions"]["default"] is False
        assert all({"code", "type", "name", "description", "default"} <= set(o) for o in options.values())
        # CRD 2.2 dev-1/dev-2: every supported version, as the first two nodes.
        assert service["extension"]["davinci-crd.version"] == ["2.0", "2.2"]


def configured(
    client: FlaskClient, config: dict[str, Any], orders: list[dict[str, Any]], **extension: Any
) -> dict[str, Any]:
    return sign(
        client,
        orders,
        prefetch={"coverage": coverage("cov-1")},
        extension={"davinci-crd.configuration": config, **extension},
    )


def test_coverage_info_false_drops_system_actions(client: FlaskClient) -> None:
    data = configured(client, {"coverage-info": False}, [dsv()])
    assert data["systemActions"] == [] and len(data["cards"]) == 1


def test_one_card_per_order_by_default_of_one_crd_card_type(client: FlaskClient) -> None:
    unknown_region = dsv("u", code={"text": "DMX study"}, bodySite=[])
    cards = configured(client, {}, [dsv(), unknown_region])["cards"]
    assert [c["source"]["topic"]["code"] for c in cards] == ["therapy-alternatives-opt", "guideline"]


def test_card_type_false_drops_those_cards(client: FlaskClient) -> None:
    # Without the alternative card the order gets the External Reference card; without both, none.
    [card] = configured(client, {"therapy-alternatives-opt": False}, [dsv()])["cards"]
    assert card["source"]["topic"]["code"] == "guideline" and card["links"] and "suggestions" not in card
    data = configured(client, {"therapy-alternatives-opt": False, "guideline": False}, [dsv()])
    assert data["cards"] == [] and len(data["systemActions"]) == 1


def test_instructions_true_adds_the_instructions_card(client: FlaskClient) -> None:
    alternative, instructions = configured(client, {"instructions": True}, [dsv()])["cards"]
    assert alternative["source"]["topic"]["code"] == "therapy-alternatives-opt"
    # CRD cards.html#instructions-response-type; the kit's instructions_response_type?: no links, no suggestions.
    assert "links" not in instructions and "suggestions" not in instructions
    assert instructions["source"]["topic"]["code"] == "claim" and instructions["indicator"] == "info"
    detail = instructions["detail"]
    assert "deny the claim" in detail and "billed" in detail and "exception" in detail and "research" in detail
    assert instructions["extension"] == alternative["extension"]
    assert configured(client, {"instructions": False}, [dsv()])["cards"].__len__() == 1


def test_max_cards_caps_cards_and_unknown_keys_are_ignored(client: FlaskClient) -> None:
    orders = [dsv("a"), dsv("b"), dsv("c")]
    data = configured(client, {"max-cards": 2, "some-future-option": "x"}, orders)
    assert len(data["cards"]) == 2 and len(data["systemActions"]) == 3
    assert configured(client, {"max-cards": "two"}, orders)["cards"].__len__() == 3


def test_card_source_names_the_payer_and_a_crd_card_type(client: FlaskClient) -> None:
    [card] = sign(client, [dsv()])["cards"]
    assert card["source"]["label"] == "Example Health Plan"
    assert card["source"]["topic"] == {
        "system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp",
        "code": "therapy-alternatives-opt",
        "display": "Optional Therapy Alternatives",
    }


@pytest.mark.parametrize(
    ("requested", "system"),
    [
        (None, "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"),
        ("2.0", "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"),
        ("2.2", "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"),
        ("9.9", "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"),
    ],
)
def test_the_card_type_system_follows_the_requested_crd_version(
    client: FlaskClient, requested: str | None, system: str
) -> None:
    extension = {"davinci-crd.requestedVersion": requested} if requested else {}
    cards = configured(client, {"instructions": True}, [dsv()], **extension)["cards"]
    assert {card["source"]["topic"]["system"] for card in cards} == {system}


# --- required prefetch: 412 ------------------------------------------------------------------------------------


@pytest.fixture
def strict_policy_client(tmp_path: Path) -> FlaskClient:
    folder = tmp_path / "cards"
    folder.mkdir()
    text = (ROOT / "policies" / "dynamic-spinal-visualization.yaml").read_text()
    marker = "    query: Coverage?patient={{context.patientId}}&status=active\n"
    assert marker in text
    (folder / "policy.yaml").write_text(text.replace(marker, marker + "    required: true\n"))
    app = create_app(
        {
            "AUTH": "off",
            "POLICY_DIR": str(folder),
            "ALLOW_HTTP_FHIR": True,
            "FHIR_TIMEOUT": 1.0,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}",
        }
    )
    return app.test_client()


def test_required_prefetch_missing_and_unreadable_is_412(strict_policy_client: FlaskClient) -> None:
    response = strict_policy_client.post(f"/cds-services/{SIGN}", json=b.hook_request("order-sign", [dsv()]))
    assert response.status_code == 412
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert "coverage" in response.get_json()["issue"][0]["diagnostics"]


def test_required_prefetch_read_from_the_server_is_fine(strict_policy_client: FlaskClient) -> None:
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-3")])) as (base, behaviour):
        data = sign(strict_policy_client, [dsv()], fhirServer=base)
    assert len(behaviour.requests) == 1  # read once, used for both the check and the assertion
    assert len(data["systemActions"]) == 1


def test_required_prefetch_not_needed_when_nothing_is_flagged(strict_policy_client: FlaskClient) -> None:
    assert sign(strict_policy_client, [b.medication_request()]) == {"cards": [], "systemActions": []}
