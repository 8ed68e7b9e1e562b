"""CRD 2.2: order-dispatch, appointment-book and encounter-start, and the coverage answers when no Coverage can be
named. Requirement ids are CRD 2.2.1's as the Inferno kit cites them (hl7.fhir.us.davinci-crd_2.2.1@...)."""

from __future__ import annotations

import copy
import json
import logging
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.config import ConfigError, load
from cds_service.engine.crd import COVERAGE_INFO_URL
from cds_service.runtime import services_of

from . import builders as b
from .fhir_server import FhirBehaviour, coverage, fhir_server
from .process_support import running_server

CERVICAL = ("122494005", "Cervical spine")
TOKEN = "secret-access-token-4c3b2a"
V22 = {"davinci-crd.requestedVersion": "2.2"}
TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    yield create_app(
        {
            "AUTH": "off",
            "ALLOW_HTTP_FHIR": True,
            "FHIR_TIMEOUT": 1.0,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'crd22.sqlite3'}",
        }
    )


def dsv(rid: str = "dsv1", *, r5: bool = False, **fields: Any) -> dict[str, Any]:
    return b.service_request(
        rid, cpt="76496", text="Digital motion x-ray of the cervical spine", body_site=CERVICAL, r5=r5, **fields
    )


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def dispatch_body(refs: list[str], **extra: Any) -> dict[str, Any]:
    context = {
        "userId": "Practitioner/prac-1",
        "patientId": "pat-1",
        "encounterId": "enc-1",
        "dispatchedOrders": refs,
        "performer": "Organization/imaging-1",
    }
    context.update(extra.pop("context", {}))
    return {"hook": "order-dispatch", "hookInstance": str(uuid.uuid4()), "context": context, **extra}


def appointment(
    aid: str = "ap1", *, based_on: list[str] | None = None, r5: bool = False, **fields: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": aid,
        "status": "proposed",
        "participant": [{"actor": {"reference": "Patient/pat-1"}, "status": "needs-action"}],
    }
    if based_on:
        resource["basedOn"] = [{"reference": ref} for ref in based_on]
    if r5:
        resource["serviceType"] = [{"concept": {"text": "Videofluoroscopy of the lumbar spine (motion study)"}}]
        resource["reason"] = [{"concept": {"text": "Low back pain"}}]
    else:
        resource["serviceType"] = [{"text": "Videofluoroscopy of the lumbar spine (motion study)"}]
        resource["reasonCode"] = [{"text": "Low back pain"}]
    resource.update(fields)
    return resource


def book_body(appointments: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    context = {
        "userId": "Practitioner/prac-1",
        "patientId": "pat-1",
        "encounterId": "enc-1",
        "appointments": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": a} for a in appointments],
        },
    }
    return {"hook": "appointment-book", "hookInstance": str(uuid.uuid4()), "context": context, **extra}


def call(client: FlaskClient, service: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post(f"/cds-services/{service}", json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    answer: dict[str, Any] = response.get_json()
    return answer


def info(action: dict[str, Any]) -> dict[str, Any]:
    [ext] = [e for e in action["resource"]["extension"] if e["url"] == COVERAGE_INFO_URL]
    return {part["url"]: part for part in ext["extension"]}


def strip_info(resource: dict[str, Any]) -> Any:
    """The kit's only_coverage_information_changed? normalisation (hook_request_resource_resolution.rb)."""
    out = copy.deepcopy(resource)
    out["extension"] = [e for e in out.get("extension", []) if e.get("url") != COVERAGE_INFO_URL]
    if not out["extension"]:
        del out["extension"]

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            return sorted((norm(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
        return value

    return norm(out)


def reason(action: dict[str, Any]) -> tuple[str | None, str]:
    concept = info(action)["reason"]["valueCodeableConcept"]
    codes = [c["code"] for c in concept.get("coding", []) if c.get("system") == TEMP]
    return (codes[0] if codes else None), concept["text"]


# --- discovery ---------------------------------------------------------------------------------------------------


def test_discovery_lists_every_primary_hook_and_encounter_start_with_prefetch_and_versions(client: FlaskClient) -> None:
    """resp-23 (coverage information on order-sign, order-dispatch, appointment-book), ops-1 (encounter-start),
    found-29 (the standard prefetch expressions), dev-1/dev-2 (davinci-crd.version)."""
    services = {s["id"]: s for s in client.get("/cds-services").get_json()["services"]}
    expected = {
        "dsv-order-dispatch": "order-dispatch",
        "dsv-appointment-book": "appointment-book",
        "dsv-encounter-start": "encounter-start",
    }
    for sid, hook in expected.items():
        service = services[sid]
        assert service["hook"] == hook
        assert service["extension"]["davinci-crd.version"] == ["2.0", "2.2"]
        assert service["prefetch"]["coverage"] == "Coverage?patient={{context.patientId}}&status=active"
        codes = {o["code"] for o in service["extension"]["davinci-crd.configuration-options"]}
        assert "coverage-info" in codes
    assert services["dsv-order-dispatch"]["prefetch"]["serviceRequests"] == (
        "ServiceRequest?_id={{context.dispatchedOrders.resolve().ofType(ServiceRequest).id}}"
    )
    assert services["dsv-appointment-book"]["prefetch"]["serviceRequests"] == (
        "ServiceRequest?_id={{context.appointments.entry.resource.basedOn.resolve().ofType(ServiceRequest).id}}"
    )
    assert "serviceRequests" not in services["dsv-order-sign"]["prefetch"]


# --- order-dispatch ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r5", [False, True], ids=["R4", "R5"])
def test_dispatched_order_from_prefetch_is_judged_as_on_order_sign(client: FlaskClient, r5: bool) -> None:
    order = dsv(r5=r5)
    body = dispatch_body(
        ["ServiceRequest/dsv1"],
        prefetch={"serviceRequests": bundle(order), "coverage": bundle(coverage("cov-1"))},
        extension=V22,
    )
    data = call(client, "dsv-order-dispatch", body)
    signed = call(
        client, "dsv-order-sign", b.hook_request("order-sign", [order], prefetch={"coverage": coverage("cov-1")})
    )
    assert [c["summary"] for c in data["cards"]] == [c["summary"] for c in signed["cards"]]
    [action] = data["systemActions"]
    assert action["resource"]["id"] == "dsv1" and info(action)["coverage"]["valueReference"] == {
        "reference": "Coverage/cov-1"
    }
    assert info(action)["covered"]["valueCode"] == "not-covered"
    assert strip_info(action["resource"]) == strip_info(order)  # resp-37


def test_dispatched_orders_not_prefetched_are_read_with_the_bearer_token(client: FlaskClient) -> None:
    lab = b.service_request("lab1", text="CBC")
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], resources=[dsv(), lab], token=TOKEN)) as (
        base,
        behaviour,
    ):
        body = dispatch_body(
            ["ServiceRequest/dsv1", "ServiceRequest/lab1", "MedicationRequest/m1"],
            fhirServer=base,
            fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "x"},
            extension=V22,
        )
        data = call(client, "dsv-order-dispatch", body)
    reads = [r for r in behaviour.requests if r["path"].endswith("/ServiceRequest")]
    assert len(reads) == 1 and reads[0]["query"]["_id"] == ["dsv1,lab1"]
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in behaviour.requests)
    assert len(data["cards"]) == 1
    [action] = data["systemActions"]  # the lab order is not this policy's: nothing said about it
    assert action["resource"]["id"] == "dsv1"


def test_a_dmx_facility_as_performer_is_evidence(client: FlaskClient) -> None:
    order = b.service_request("o1", text="Fluoroscopy of the cervical spine")
    prefetch = {"serviceRequests": bundle(order), "coverage": coverage("cov-1")}
    plain = call(client, "dsv-order-dispatch", dispatch_body(["ServiceRequest/o1"], prefetch=prefetch))
    assert plain["cards"] == []
    at_dmx = copy.deepcopy(order)
    at_dmx["performer"] = [{"reference": "Organization/dmx", "display": "Digital Motion X-ray (DMX) imaging center"}]
    prefetch = {"serviceRequests": bundle(at_dmx), "coverage": coverage("cov-1")}
    data = call(client, "dsv-order-dispatch", dispatch_body(["ServiceRequest/o1"], prefetch=prefetch))
    assert len(data["cards"]) == 1
    # The same evidence from a fulfillment Task's owner.
    task = {
        "resourceType": "Task",
        "id": "t1",
        "status": "requested",
        "intent": "order",
        "focus": {"reference": "ServiceRequest/o1"},
        "owner": {"reference": "Organization/dmx", "display": "Digital Motion X-ray (DMX) imaging center"},
    }
    prefetch = {"serviceRequests": bundle(order), "coverage": coverage("cov-1")}
    body = dispatch_body(["ServiceRequest/o1"], prefetch=prefetch, context={"fulfillmentTasks": [task]})
    assert len(call(client, "dsv-order-dispatch", body)["cards"]) == 1


def test_an_order_that_cannot_be_read_gets_a_technical_answer(client: FlaskClient) -> None:
    """resp-43: the FHIR server fails the order read; the order still gets indeterminate / technical."""
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], failing={"ServiceRequest": 503})) as (base, _):
        data = call(
            client, "dsv-order-dispatch", dispatch_body(["ServiceRequest/dsv1"], fhirServer=base, extension=V22)
        )
        old = call(client, "dsv-order-dispatch", dispatch_body(["ServiceRequest/dsv1"], fhirServer=base))
    [action] = data["systemActions"]
    # Only its reference is known: the update names it and adds the answer (coverage_information_extension_only).
    assert set(action["resource"]) == {"resourceType", "id", "extension"}
    assert info(action)["covered"]["valueCode"] == "indeterminate"
    code, text = reason(action)
    assert code == "technical" and "503" in text
    assert old["systemActions"] == []  # CRD 2.0 has no code for it: as before


def test_dispatched_orders_must_be_references(client: FlaskClient) -> None:
    for bad in [[{"reference": "ServiceRequest/1"}], 7, [""]]:
        body = dispatch_body([])
        body["context"]["dispatchedOrders"] = bad
        answer = call(client, "dsv-order-dispatch", body, 400)
        assert answer["resourceType"] == "OperationOutcome"
    body = dispatch_body([])
    del body["context"]["dispatchedOrders"]
    assert call(client, "dsv-order-dispatch", body, 400)["issue"][0]["expression"] == ["context.dispatchedOrders"]


# --- appointment-book ----------------------------------------------------------------------------------------------


def test_an_appointment_based_on_an_order_updates_the_order_not_the_appointment(client: FlaskClient) -> None:
    """cards.md (FHIR-50318): the update of an Appointment basedOn a ServiceRequest is against the ServiceRequest."""
    order = dsv()
    body = book_body(
        [appointment(based_on=["ServiceRequest/dsv1"])],
        prefetch={"serviceRequests": bundle(order), "coverage": bundle(coverage("cov-1"))},
        extension=V22,
    )
    data = call(client, "dsv-appointment-book", body)
    [card] = data["cards"]
    assert "Digital motion x-ray of the cervical spine" in card["detail"]  # the card names the booked study
    [action] = data["systemActions"]
    assert action["resource"]["resourceType"] == "ServiceRequest"
    assert strip_info(action["resource"]) == strip_info(order)


def test_the_appointment_adds_its_own_words_to_the_order_it_books(client: FlaskClient) -> None:
    order = b.service_request("o1", text="Spine imaging, cervical")
    booked = appointment(based_on=["ServiceRequest/o1"], serviceType=[{"text": "DMX digital motion x-ray"}])
    prefetch = {"serviceRequests": bundle(order), "coverage": coverage("cov-1")}
    unbooked = appointment(based_on=["ServiceRequest/o1"], serviceType=[{"text": "Imaging"}], reasonCode=[])
    assert call(client, "dsv-appointment-book", book_body([unbooked], prefetch=prefetch))["cards"] == []
    data = call(client, "dsv-appointment-book", book_body([booked], prefetch=prefetch))
    assert len(data["cards"]) == 1
    assert [a["resource"]["id"] for a in data["systemActions"]] == ["o1"]


@pytest.mark.parametrize("r5", [False, True], ids=["R4", "R5"])
def test_an_appointment_without_an_order_is_judged_from_its_own_fields(client: FlaskClient, r5: bool) -> None:
    booked = appointment(r5=r5, description="Motion study of the lumbar spine")
    data = call(
        client,
        "dsv-appointment-book",
        book_body([booked], prefetch={"coverage": bundle(coverage("cov-1"))}, extension=V22),
    )
    [card] = data["cards"]
    assert "Videofluoroscopy of the lumbar spine" in card["detail"]
    assert "suggestions" not in card  # a booking is not an order to delete and replace
    assert card["extension"]["davinci-crd.associated-resource"] == [{"reference": "Appointment/ap1"}]
    [action] = data["systemActions"]
    assert action["resource"]["resourceType"] == "Appointment"
    assert strip_info(action["resource"]) == strip_info(booked)


def test_two_appointments_booking_one_order_give_one_action(client: FlaskClient) -> None:
    """resp-29: one coverage-information action per in-scope resource."""
    body = book_body(
        [appointment("a1", based_on=["ServiceRequest/dsv1"]), appointment("a2", based_on=["ServiceRequest/dsv1"])],
        prefetch={"serviceRequests": bundle(dsv()), "coverage": coverage("cov-1")},
    )
    data = call(client, "dsv-appointment-book", body)
    assert [a["resource"]["id"] for a in data["systemActions"]] == ["dsv1"]


def test_a_based_on_order_is_read_when_not_prefetched(client: FlaskClient) -> None:
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], resources=[dsv()])) as (base, behaviour):
        body = book_body([appointment(based_on=["ServiceRequest/dsv1"])], fhirServer=base)
        data = call(client, "dsv-appointment-book", body)
    assert [r["path"] for r in behaviour.requests] == ["/fhir/ServiceRequest", "/fhir/Coverage"]
    assert [a["resource"]["id"] for a in data["systemActions"]] == ["dsv1"]


def test_a_based_on_order_that_cannot_be_read_gets_a_technical_answer(client: FlaskClient) -> None:
    """resp-43 on appointment-book: the order the appointment books cannot be read (the server fails); the order
    gets indeterminate / technical, the appointment itself is not updated."""
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], failing={"ServiceRequest": 500})) as (base, _):
        body = book_body([appointment(based_on=["ServiceRequest/sr-9"])], fhirServer=base, extension=V22)
        data = call(client, "dsv-appointment-book", body)
    [action] = data["systemActions"]
    assert (action["resource"]["resourceType"], action["resource"]["id"]) == ("ServiceRequest", "sr-9")
    assert reason(action)[0] == "technical" and "500" in reason(action)[1]


def test_appointments_must_be_a_bundle(client: FlaskClient) -> None:
    body = book_body([])
    body["context"]["appointments"] = [appointment()]
    assert call(client, "dsv-appointment-book", body, 400)["issue"][0]["expression"] == ["context.appointments"]


# --- the coverage answers ----------------------------------------------------------------------------------------


def sign22(client: FlaskClient, **extra: Any) -> dict[str, Any]:
    return call(client, "dsv-order-sign", b.hook_request("order-sign", [dsv()], extension=V22, **extra))


@pytest.mark.parametrize(
    ("behaviour", "words"),
    [
        (FhirBehaviour(status=500), "500"),
        (FhirBehaviour(token="another-token"), "401"),
        (FhirBehaviour(status=403), "403"),
        (FhirBehaviour(delay=1.5), "within"),
    ],
    ids=["5xx", "401", "403", "timeout"],
)
def test_a_coverage_read_that_fails_is_indeterminate_technical(
    client: FlaskClient, behaviour: FhirBehaviour, words: str
) -> None:
    """resp-43 (the kit's TechnicalIssuesTest): indeterminate, reason technical with the details in text; the card
    still goes out."""
    with fhir_server(behaviour) as (base, _):
        data = sign22(client, fhirServer=base, fhirAuthorization={"access_token": TOKEN})
    assert len(data["cards"]) == 1
    [action] = data["systemActions"]
    parts = info(action)
    assert parts["covered"]["valueCode"] == "indeterminate"
    assert parts["pa-needed"]["valueCode"] == "indeterminate"  # crd-ci-q2: anything but not-covered has pa-needed
    code, text = reason(action)
    assert code == "technical" and words in text and TOKEN not in json.dumps(data)
    assert "reference" not in parts["coverage"]["valueReference"]


def test_an_open_breaker_is_a_technical_answer_too(tmp_path: Path) -> None:
    app = create_app(
        {
            "AUTH": "off",
            "ALLOW_HTTP_FHIR": True,
            "FHIR_TIMEOUT": 1.0,
            "FHIR_BREAKER_FAILURES": 1,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'b.sqlite3'}",
        }
    )
    client = app.test_client()
    with fhir_server(FhirBehaviour(status=500)) as (base, behaviour):
        sign22(client, fhirServer=base)
        data = sign22(client, fhirServer=base)
    assert len(behaviour.requests) == 1  # the second call did not reach the server
    assert reason(data["systemActions"][0])[0] == "technical"


@pytest.mark.parametrize(
    ("prefetch", "code", "named"),
    [
        ({"patient": None}, "no-member-found", None),
        ({"coverage": bundle()}, "coverage-not-found", None),
        ({"coverage": None}, "coverage-not-found", None),
        ({"coverage": bundle(coverage("c1"), coverage("c2"))}, "coverage-not-found", None),
        ({"coverage": bundle(coverage("old", status="cancelled"))}, "no-active-coverage", "Coverage/old"),
        ({"coverage": {**coverage("ended"), "period": {"end": "2020-01-31"}}}, "no-active-coverage", "Coverage/ended"),
    ],
    ids=["patient-not-found", "none", "null", "two-alike", "cancelled", "ended"],
)
def test_no_member_or_no_single_active_coverage_is_not_covered_with_its_reason(
    client: FlaskClient, prefetch: dict[str, Any], code: str, named: str | None
) -> None:
    """resp-44 (no-member-found), resp-45 (coverage-not-found, no-active-coverage): not-covered with the code from
    CRD's CodeSystem temp; `coverage` names the Coverage when there is one, else says why there is none."""
    data = sign22(client, prefetch=prefetch)
    [action] = data["systemActions"]
    parts = info(action)
    assert parts["covered"]["valueCode"] == "not-covered" and "pa-needed" not in parts
    assert reason(action)[0] == code
    reference = parts["coverage"]["valueReference"]
    if named:
        assert reference == {"reference": named}
    else:
        assert reference["extension"][0]["url"] == "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
        assert reference["display"]


def test_a_patient_the_fhir_server_does_not_know_is_no_member(client: FlaskClient) -> None:
    with fhir_server(FhirBehaviour(failing={"Coverage": 404})) as (base, _):
        data = sign22(client, fhirServer=base)
    assert reason(data["systemActions"][0])[0] == "no-member-found"


def test_crd_20_clients_keep_todays_answers(client: FlaskClient) -> None:
    """Version negotiation as before (dev-3): without 2.2 asked for, no coverage answer without a Coverage, and of
    several active Coverages the first."""
    order = dsv()
    for prefetch in [{"coverage": bundle()}, {"patient": None}]:
        data = call(client, "dsv-order-sign", b.hook_request("order-sign", [order], prefetch=prefetch))
        assert data["systemActions"] == [] and len(data["cards"]) == 1
    with fhir_server(FhirBehaviour(status=500)) as (base, _):
        data = call(client, "dsv-order-sign", b.hook_request("order-sign", [order], fhirServer=base))
    assert data["systemActions"] == []
    two = {"coverage": bundle(coverage("c1"), coverage("c2"))}
    [action] = call(client, "dsv-order-sign", b.hook_request("order-sign", [order], prefetch=two))["systemActions"]
    assert info(action)["coverage"]["valueReference"] == {"reference": "Coverage/c1"}


# --- never resend, only coverage information changes, configuration -----------------------------------------------


@pytest.mark.parametrize("hook", ["order-sign", "order-dispatch", "appointment-book"])
def test_an_order_that_already_says_it_gets_no_action_and_a_new_answer_replaces_the_old(
    client: FlaskClient, hook: str
) -> None:
    """resp-35: nothing is resent unless something is new; resp-37: only coverage-information changes, and an
    earlier assertion about the same coverage is modified, not stacked (one coverage-assertion-id per coverage)."""

    def ask(order: dict[str, Any], prefetch: dict[str, Any]) -> dict[str, Any]:
        if hook == "order-sign":
            return call(client, "dsv-order-sign", b.hook_request(hook, [order], prefetch=prefetch, extension=V22))
        if hook == "order-dispatch":
            body = dispatch_body(["ServiceRequest/dsv1"], prefetch={**prefetch, "serviceRequests": bundle(order)})
            return call(client, "dsv-order-dispatch", {**body, "extension": V22})
        body = book_body(
            [appointment(based_on=["ServiceRequest/dsv1"])], prefetch={**prefetch, "serviceRequests": bundle(order)}
        )
        return call(client, "dsv-appointment-book", {**body, "extension": V22})

    missing = {"coverage": bundle()}
    [first] = ask(dsv(), missing)["systemActions"]
    assert reason(first)[0] == "coverage-not-found"
    again = ask(first["resource"], missing)
    assert again["systemActions"] == [] and len(again["cards"]) == 1
    [second] = ask(first["resource"], {"coverage": coverage("cov-9")})["systemActions"]
    infos = [e for e in second["resource"]["extension"] if e["url"] == COVERAGE_INFO_URL]
    # The Coverage found supersedes the earlier "none found": one assertion, about it.
    assert [i["extension"][0]["valueReference"] for i in infos] == [{"reference": "Coverage/cov-9"}]
    assert strip_info(second["resource"]) == strip_info(dsv())
    [third] = ask(second["resource"], missing)["systemActions"]
    kinds = [i["extension"][0]["valueReference"].get("reference") for i in third["resource"]["extension"]]
    assert kinds.count(None) == 1  # the earlier no-coverage answer was replaced, not repeated


@pytest.mark.parametrize("hook", ["order-dispatch", "appointment-book"])
def test_coverage_info_false_drops_coverage_answers_on_every_hook(client: FlaskClient, hook: str) -> None:
    """dev-4..17 (the kit's coverage_info_configuration_test): coverage-info false, no coverage answer at all."""
    config = {"davinci-crd.configuration": {"coverage-info": False}, **V22}
    if hook == "order-dispatch":
        body = dispatch_body(["ServiceRequest/dsv1"], prefetch={"serviceRequests": bundle(dsv())}, extension=config)
        service = "dsv-order-dispatch"
    else:
        body = book_body([appointment()], prefetch={"coverage": bundle()}, extension=config)
        service = "dsv-appointment-book"
    data = call(client, service, body)
    assert data["systemActions"] == [] and len(data["cards"]) == 1
    with fhir_server(FhirBehaviour(failing={"ServiceRequest": 500})) as (base, _):
        body = dispatch_body(["ServiceRequest/dsv1"], fhirServer=base, extension=config)
        assert call(client, "dsv-order-dispatch", body)["systemActions"] == []


@pytest.mark.parametrize(
    "service", ["dsv-order-sign", "dsv-order-dispatch", "dsv-appointment-book", "dsv-encounter-start"]
)
def test_unknown_configuration_context_and_elements_are_ignored(client: FlaskClient, service: str) -> None:
    """dev-4..17 and hook-23 (unknown configuration keys and values), found-33 and the kit's unknown_context_test /
    unknown_cds_hooks_elements_test: a normal 200."""
    prefetch = {"serviceRequests": bundle(dsv()), "coverage": coverage("cov-1")}
    bodies = {
        "dsv-order-sign": b.hook_request("order-sign", [dsv()], prefetch=prefetch),
        "dsv-order-dispatch": dispatch_body(["ServiceRequest/dsv1"], prefetch=prefetch),
        "dsv-appointment-book": book_body([appointment(based_on=["ServiceRequest/dsv1"])], prefetch=prefetch),
        "dsv-encounter-start": {
            "hook": "encounter-start",
            "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/prac-1", "patientId": "pat-1", "encounterId": "enc-1"},
        },
    }
    plain = call(client, service, bodies[service])
    body = copy.deepcopy(bodies[service])
    body["context"]["somethingNew"] = {"x": [1, 2]}
    body["futureElement"] = {"y": True}
    body["extension"] = {
        "davinci-crd.configuration": {"no-such-option": 3, "coverage-info": "sometimes", "max-cards": "many"},
        "org.example.other": [1],
    }
    data = call(client, service, body)
    assert len(data["cards"]) == len(plain["cards"]) and len(data["systemActions"]) == len(plain["systemActions"])


# --- encounter-start and the Coverage cache ----------------------------------------------------------------------


def start_body(base: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "encounter-start",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/prac-1", "patientId": "pat-1", "encounterId": "enc-1"},
        **extra,
    }
    if base:
        body["fhirServer"] = base
    return body


def wait_for(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_encounter_start_answers_at_once_and_warms_the_coverage_cache(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """ops-1: encounter-start answers with no cards; the Coverage it reads serves the encounter's later hooks whose
    prefetch lacks it (here the server then fails, and the order still gets the Coverage's answer)."""
    client = app.test_client()
    caplog.set_level(logging.DEBUG, logger="cds_service")
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-7", patient="pat-1")], delay=0.3)) as (base, behaviour):
        started = time.monotonic()
        assert call(client, "dsv-encounter-start", start_body(base)) == {"cards": [], "systemActions": []}
        assert time.monotonic() - started < 0.25  # not waiting for the read
        cache = services_of(app).runtime.coverage.cache
        assert cache is not None
        wait_for(lambda: len(cache) == 1)
        behaviour.status = 500
        data = sign22(client, fhirServer=base)
    [action] = data["systemActions"]
    assert info(action)["coverage"]["valueReference"] == {"reference": "Coverage/cov-7"}
    assert len(behaviour.requests) == 1
    assert "pat-1" not in caplog.text


def test_the_cache_is_kept_apart_per_client_of_a_shared_fhir_server(app: Flask) -> None:
    """Two EHR clients (fhirAuthorization.subject) reading the same FHIR server URL never share a cached Coverage."""

    def auth(subject: str) -> dict[str, Any]:
        return {
            "access_token": "t",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/*.read",
            "subject": subject,
        }

    client = app.test_client()
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-7", patient="pat-1")])) as (base, behaviour):
        call(client, "dsv-encounter-start", start_body(base, fhirAuthorization=auth("client-a")))
        cache = services_of(app).runtime.coverage.cache
        assert cache is not None
        wait_for(lambda: len(cache) == 1)
        behaviour.status = 500
        other = sign22(client, fhirServer=base, fhirAuthorization=auth("client-b"))
        same = sign22(client, fhirServer=base, fhirAuthorization=auth("client-a"))
    [refused] = other["systemActions"]
    assert "valueReference" not in info(refused)["coverage"] or info(refused)["coverage"]["valueReference"] != {
        "reference": "Coverage/cov-7"
    }
    [cached] = same["systemActions"]
    assert info(cached)["coverage"]["valueReference"] == {"reference": "Coverage/cov-7"}


def test_the_cache_forgets_after_its_time_to_live(tmp_path: Path) -> None:
    app = create_app(
        {
            "AUTH": "off",
            "ALLOW_HTTP_FHIR": True,
            "FHIR_TIMEOUT": 1.0,
            "COVERAGE_CACHE_TTL": 0.3,
            "DATABASE_URL": f"sqlite:///{tmp_path / 't.sqlite3'}",
        }
    )
    client = app.test_client()
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-7")])) as (base, behaviour):
        call(client, "dsv-encounter-start", start_body(base))
        cache = services_of(app).runtime.coverage.cache
        assert cache is not None
        wait_for(lambda: len(cache) == 1)
        behaviour.status = 500
        time.sleep(0.35)
        data = sign22(client, fhirServer=base)
    assert reason(data["systemActions"][0])[0] == "technical"


def test_the_cache_is_per_fhir_server_and_patient_and_can_be_off(tmp_path: Path) -> None:
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-7")])) as (base, behaviour):
        app = create_app(
            {"AUTH": "off", "ALLOW_HTTP_FHIR": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}"}
        )
        client = app.test_client()
        prefetch = {"coverage": bundle(coverage("cov-p"))}
        call(client, "dsv-encounter-start", start_body(base, prefetch=prefetch))
        assert not behaviour.requests  # the prefetched Coverage is kept, nothing read
        other = b.hook_request("order-sign", [dsv()], fhirServer=base, extension=V22)
        other["context"]["patientId"] = "pat-2"
        [action] = call(client, "dsv-order-sign", other)["systemActions"]
        assert reason(action)[0] == "coverage-not-found"  # pat-2 has none: read, not taken from pat-1's entry
        [action] = sign22(client, fhirServer=base)["systemActions"]
        assert info(action)["coverage"]["valueReference"] == {"reference": "Coverage/cov-p"}
        off = create_app(
            {
                "AUTH": "off",
                "ALLOW_HTTP_FHIR": True,
                "COVERAGE_CACHE_TTL": 0,
                "DATABASE_URL": f"sqlite:///{tmp_path / 'o.sqlite3'}",
            }
        )
        call(off.test_client(), "dsv-encounter-start", start_body(base, prefetch=prefetch))
        [action] = sign22(off.test_client(), fhirServer=base)["systemActions"]
        assert info(action)["coverage"]["valueReference"] == {"reference": "Coverage/cov-7"}


def test_the_cache_ttl_setting_is_checked() -> None:
    assert load({"COVERAGE_CACHE_TTL": "45"}).coverage_cache_ttl == 45.0
    for bad in ["-1", "soon", "100000"]:
        with pytest.raises(ConfigError, match="CDS_COVERAGE_CACHE_TTL"):
            load({"COVERAGE_CACHE_TTL": bad})


def test_the_real_server_answers_the_new_hooks_and_keeps_the_encounter_coverage(tmp_path: Path) -> None:
    """`cds-service serve` (one worker: the cache is per process): encounter-start, then order-dispatch whose
    prefetch lacks the Coverage while the FHIR server has gone down."""
    stand_in = fhir_server(FhirBehaviour(coverages=[coverage("cov-5")], resources=[dsv()]))
    with (
        stand_in as (fhir, behaviour),
        running_server(tmp_path, "--workers", "1", env={"CDS_ALLOW_HTTP_FHIR": "true"}) as (_, base, log),
    ):

        def post(service: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                f"{base}/cds-services/{service}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                answer: dict[str, Any] = json.loads(response.read())
                return answer

        assert post("dsv-encounter-start", start_body(fhir)) == {"cards": [], "systemActions": []}
        wait_for(lambda: any(r["path"].endswith("/Coverage") for r in behaviour.requests))
        time.sleep(0.2)
        behaviour.failing["Coverage"] = 500
        body = dispatch_body(["ServiceRequest/dsv1"], fhirServer=fhir, extension=V22)
        data = post("dsv-order-dispatch", body)
        assert len(data["cards"]) == 1
        [action] = data["systemActions"]
        assert info(action)["coverage"]["valueReference"] == {"reference": "Coverage/cov-5"}
        assert "pat-1" not in log.read_text()
