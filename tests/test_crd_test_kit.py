"""The Da Vinci CRD test kit's server checks, replayed through the app over fixtures/hooks/*.request.json.

Source: inferno-framework/davinci-crd-test-kit, lib/davinci_crd_test_kit/server/v2.0.1 (the suite that pins CRD
2.0.1) and cross_suite/ (cards_validation.rb, cards_identification.rb, suggestion_actions_validation.rb,
hook_request_field_validation.rb). Each test names the kit test it replays by its id. Where CRD 2.2 is stricter, the
test also holds the response to CRD 2.2's logical models (HL7/davinci-crd input/fsh/logicals/CRDCDSHooksResponse.fsh)
and to CRD's profile-servicerequest (input/fsh/profiles/ServiceRequest.fsh): the kit validates every resource a card
or systemAction carries against that profile (structure_definition_map_v201 'ServiceRequest').
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.runtime import services_of

from .conftest import ROOT
from .fhir_server import fhir_server

FIXTURES = ROOT / "fixtures" / "hooks"
COVERAGE_INFO = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CARD_TYPE_SYSTEMS = {
    "2.0": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp",
    "2.2": "http://terminology.hl7.org/CodeSystem/cdshooks-card-type",
}
# CRD 2.0.1 CodeSystem temp, concepts under _cardType; HL7 terminology's cdshooks-card-type adds unsolicited-determ.
CARD_TYPES = {
    "coverage-info",
    "claim",
    "insurance",
    "limits",
    "network",
    "appropriate-use",
    "cost",
    "therapy-alternatives-opt",
    "therapy-alternatives-req",
    "clinical-reminder",
    "duplicate-therapy",
    "contraindication",
    "guideline",
    "off-guideline",
}
# The service for each hook (CRD 2.2.1 resp-23: every primary hook; ops-1: encounter-start).
SERVICES = {
    "order-select": "dsv-order-select",
    "order-sign": "dsv-order-sign",
    "order-dispatch": "dsv-order-dispatch",
    "appointment-book": "dsv-appointment-book",
    "encounter-start": "dsv-encounter-start",
}
ORDER_TYPES = ["DeviceRequest", "MedicationRequest", "NutritionOrder", "ServiceRequest", "VisionPrescription"]
# FHIR dateTime (https://hl7.org/fhir/R4/datatypes.html#dateTime).
DATE_TIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)


@dataclass
class Exchange:
    name: str
    request: dict[str, Any]
    status: int
    response: Any


@pytest.fixture(scope="module")
def exchanges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Exchange]]:
    """Every fixture request through the app (authentication off; the EHR's FHIR server a local stand-in)."""
    folder = tmp_path_factory.mktemp("kit")
    app = create_app({"AUTH": "off", "ALLOW_HTTP_FHIR": True, "DATABASE_URL": f"sqlite:///{folder / 'kit.db'}"})
    client = app.test_client()
    out = []
    with fhir_server() as (base, _):
        for path in sorted(FIXTURES.glob("*.request.json")):
            body = json.loads(path.read_text())
            if "fhirServer" in body:
                body["fhirServer"] = base
            response = client.post(f"/cds-services/{SERVICES[body['hook']]}", json=body)
            out.append(Exchange(path.name, body, response.status_code, response.get_json()))
    yield out
    services_of(app).store.close()


@pytest.fixture(scope="module")
def discovery(exchanges: list[Exchange], tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('d') / 'd.db'}"})
    client: FlaskClient = app.test_client()
    response = client.get("/cds-services", headers={"Accept": "application/json"})
    services_of(app).store.close()
    # crd_v201_discovery_endpoint_test: 200 and a JSON body.
    assert response.status_code == 200
    return json.loads(response.data)


def cards_of(exchanges: list[Exchange]) -> list[tuple[Exchange, dict[str, Any]]]:
    return [(x, card) for x in exchanges for card in x.response["cards"]]


# --- what the kit's helpers check (cross_suite/) ------------------------------------------------------------------


def valid_url(value: Any) -> bool:
    parsed = urlparse(value) if isinstance(value, str) else None
    return bool(parsed and parsed.scheme in ("http", "https") and parsed.netloc)


def present(value: Any) -> bool:
    """Ruby's `present?`: not nil, not empty."""
    return value is not None and value != "" and value != [] and value != {}


def presence_and_type(obj: dict[str, Any], field: str, kind: type | str, where: str) -> list[str]:
    """hook_request_field_validation.rb validate_presence_and_type: present, of the type, not empty."""
    value = obj.get(field)
    if value is None:
        return [f"{where} has no {field}"]
    if kind == "URL":
        if not valid_url(value):
            return [f"{where}.{field} is not a valid URL"]
    elif not isinstance(value, kind):  # type: ignore[arg-type]
        return [f"{where}.{field} is not {kind}"]
    return [] if present(value) else [f"{where}.{field} is empty"]


def identify_card_type(card: dict[str, Any]) -> str | None:
    """cards_identification.rb identify_card_type, in the kit's order (the first match wins)."""
    suggestions = card.get("suggestions")
    links = card.get("links")

    def resource_type(action: dict[str, Any]) -> str | None:
        if action.get("type") in ("create", "update"):
            return (action.get("resource") or {}).get("resourceType")
        return str(action.get("resourceId") or "").split("/")[0]

    def has(actions: list[dict[str, Any]], kind: str) -> bool:
        return any(
            a.get("type") == kind and resource_type(a) in [*ORDER_TYPES, "Encounter", "Medication"] for a in actions
        )

    if suggestions is not None and all(
        all(a.get("type") == "create" for a in s.get("actions") or []) and s.get("actions") for s in suggestions
    ):
        return "companions_prerequisites"
    if links is not None and all(link.get("type") == "absolute" for link in links):
        return "external_reference"
    if not present(links) and not present(suggestions):
        return "instructions"
    if links is not None and all(link.get("type") == "smart" for link in links):
        return "launch_smart_app"
    if suggestions and any(
        has(s.get("actions") or [], "update") or (has(s.get("actions") or [], "delete") and has(s["actions"], "create"))
        for s in suggestions
    ):
        return "propose_alternate_request"
    return None


def servicerequest_problems(resource: dict[str, Any]) -> list[str]:
    """CRD profile-servicerequest (on US Core ServiceRequest): the required elements and their types.

    status and intent (base 1..1), code 1.. (only CodeableConcept in R4; the concept of an R5 CodeableReference),
    subject 1..1 Reference(Patient), authoredOn 1.., requester 1.. Reference(Practitioner | PractitionerRole).
    The base model is checked too: fhir.resources R4B, or R5 for an R5-shaped order.
    """
    problems = []
    r5 = isinstance(resource.get("code"), dict) and "concept" in resource["code"]
    if r5:
        from fhir.resources.servicerequest import ServiceRequest as Model
    else:
        from fhir.resources.R4B.servicerequest import ServiceRequest as Model  # type: ignore[assignment]
    try:
        Model.model_validate(resource)
    except ValueError as exc:
        problems.append(f"base model: {exc}"[:300])
    for field in ("status", "intent"):
        if not isinstance(resource.get(field), str):
            problems.append(f"{field} missing")
    concept = resource.get("code", {}).get("concept") if r5 else resource.get("code")
    if not isinstance(concept, dict) or not (concept.get("coding") or concept.get("text")):
        problems.append("code missing (1..)")
    subject = (resource.get("subject") or {}).get("reference", "")
    if not re.fullmatch(r"(.*/)?Patient/[A-Za-z0-9\-.]{1,64}", subject):
        problems.append(f"subject {subject!r} is not a Patient reference")
    if not (isinstance(resource.get("authoredOn"), str) and DATE_TIME.fullmatch(resource["authoredOn"])):
        problems.append("authoredOn missing (1..)")
    requester = (resource.get("requester") or {}).get("reference", "")
    if not re.fullmatch(r"(.*/)?(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}", requester):
        problems.append(f"requester {requester!r} is not a Practitioner(Role) reference")
    return problems


def source_resources(exchange: Exchange) -> dict[str, dict[str, Any]]:
    """The resources a call is about, by Type/id, where the v2.2.1 kit looks for them
    (hook_request_resource_resolution.rb): draftOrders or appointments entries, then any prefetched resource or
    Bundle entry (an order-dispatch's orders, an appointment's basedOn order)."""
    context = exchange.request["context"]
    found: dict[str, dict[str, Any]] = {}
    bundles = [context.get("draftOrders"), context.get("appointments"), *exchange.request.get("prefetch", {}).values()]
    for value in bundles:
        if not isinstance(value, dict):
            continue
        resources = [e["resource"] for e in value.get("entry", []) if isinstance(e, dict) and "resource" in e]
        for resource in resources if value.get("resourceType") == "Bundle" else [value]:
            found.setdefault(f"{resource.get('resourceType')}/{resource.get('id')}", resource)
    return found


def draft_refs(exchange: Exchange) -> set[str]:
    """suggestion_actions_validation.rb draft_orders_bundle_entry_refs: Type/id of every draftOrders entry (of the
    orders the hook is about, for hooks without draftOrders)."""
    context = exchange.request["context"]
    if "draftOrders" in context:
        entries = context["draftOrders"].get("entry", [])
        return {f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}" for e in entries if "resource" in e}
    return {ref for ref in source_resources(exchange) if ref.split("/")[0] in [*ORDER_TYPES, "Appointment"]}


def action_problems(action: dict[str, Any]) -> list[str]:
    """suggestion_actions_validation.rb action_fields_validation (the cross-suite version: resourceId a String)."""
    problems = presence_and_type(action, "type", str, "Action") + presence_and_type(
        action, "description", str, "Action"
    )
    if action.get("type") not in ("create", "update", "delete"):
        return [*problems, f"action type {action.get('type')!r}"]
    if action["type"] in ("create", "update"):
        if not isinstance(action.get("resource"), dict) or not action["resource"].get("resourceType"):
            problems.append("create/update without a FHIR resource")
    else:
        problems += presence_and_type(action, "resourceId", str, "delete Action")
        if not re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", str(action.get("resourceId"))):
            problems.append("resourceId is not a relative reference")
    return problems


# --- discovery ----------------------------------------------------------------------------------------------------


def test_discovery_services_are_valid(discovery: Any) -> None:
    """crd_v201_discovery_services_validation: services[], each with hook, description and id strings."""
    services = discovery["services"]
    assert isinstance(services, list) and services
    for service in services:
        for field in ("hook", "description", "id"):
            assert isinstance(service.get(field), str) and service[field], (service.get("id"), field)
    assert {s["hook"] for s in services} == set(SERVICES)


def test_discovery_declares_crd_versions_and_configuration_options(discovery: Any) -> None:
    """CRD 2.2 deviations dev-1/dev-2 (davinci-crd.version, checked by the kit's v2.2.1 discovery tests) and dev-4,
    dev-5, dev-8 (configuration options: four elements and a default, a boolean per card type, unique codes, names
    and descriptions)."""
    for service in discovery["services"]:
        versions = service["extension"]["davinci-crd.version"]
        assert versions and all(re.fullmatch(r"\d+\.\d+", v) for v in versions) and "2.0" in versions
        options = service["extension"]["davinci-crd.configuration-options"]
        for option in options:
            assert {"code", "type", "name", "description", "default"} <= set(option)
            assert option["type"] in ("boolean", "integer")
            assert isinstance(option["default"], bool if option["type"] == "boolean" else int)
            assert re.fullmatch(r"[A-Za-z_$][\w$-]*", option["code"])
        for key in ("code", "name", "description"):
            assert len({o[key] for o in options}) == len(options), key
        codes = {o["code"] for o in options}
        assert {"coverage-info", "max-cards", "instructions"} <= codes


# --- service call and response --------------------------------------------------------------------------------------


def test_every_service_call_succeeds(exchanges: list[Exchange]) -> None:
    """crd_service_call_test: a 200 with a JSON body for each request."""
    assert len(exchanges) >= 9
    for x in exchanges:
        assert x.status == 200 and isinstance(x.response, dict), x.name


def test_service_responses_have_valid_cards_and_system_actions(exchanges: list[Exchange]) -> None:
    """crd_service_response_validation (cards_validation.rb cards_check, perform_system_actions_validation)."""
    for x in exchanges:
        cards, actions = x.response.get("cards"), x.response.get("systemActions")
        assert isinstance(cards, list), x.name
        if x.request["hook"] == "order-sign":  # SYSTEM_ACTIONS_HOOK_NAMES
            assert isinstance(actions, list), x.name
        for card in cards:
            problems = [
                *presence_and_type(card, "summary", str, "Card"),
                *presence_and_type(card, "indicator", str, "Card"),
                *presence_and_type(card, "source", dict, "Card"),
                *presence_and_type(card["source"], "label", str, "Source"),
                *presence_and_type(card["source"], "topic", dict, "Source"),
                *presence_and_type(card["source"]["topic"], "code", str, "Source topic"),
                *presence_and_type(card["source"]["topic"], "system", str, "Source topic"),
            ]
            assert not problems, (x.name, problems)
            assert len(card["summary"]) < 140 and card["indicator"] in ("info", "warning", "critical")
        for action in actions or []:
            assert not action_problems(action), (x.name, action_problems(action))


def test_cards_have_valid_optional_fields(exchanges: list[Exchange]) -> None:
    """crd_card_optional_fields_validation (cards_validation.rb valid_card_with_optionals?)."""
    for x, card in cards_of(exchanges):
        for field, kind in (("uuid", str), ("detail", str), ("suggestions", list), ("overrideReasons", list)):
            if card.get(field) is not None:
                assert not presence_and_type(card, field, kind, "Card"), (x.name, field)
        if card.get("links") is not None:
            assert not presence_and_type(card, "links", list, "Card")
        if present(card.get("suggestions")):
            assert card.get("selectionBehavior") in ("at-most-one", "any")
        for reason in card.get("overrideReasons", []):
            for field in ("code", "system", "display"):
                assert not presence_and_type(reason, field, str, "OverrideReason Coding")
        for link in card.get("links", []):
            assert not (
                presence_and_type(link, "label", str, "Link")
                + presence_and_type(link, "type", str, "Link")
                + presence_and_type(link, "url", "URL", "Link")
            )
            assert link["type"] in ("absolute", "smart") and not (link["type"] == "absolute" and "appContext" in link)
        for suggestion in card.get("suggestions", []):
            assert not presence_and_type(suggestion, "label", str, "Suggestion")
            assert isinstance(suggestion["actions"], list) and suggestion["actions"]
            for action in suggestion["actions"]:
                assert not action_problems(action), (x.name, action_problems(action))


# --- card types ---------------------------------------------------------------------------------------------------


def test_external_reference_cards_are_valid(exchanges: list[Exchange]) -> None:
    """crd_v201_external_reference_card_validation: a card whose links are all absolute. CRD 2.2
    CRDCDSHooksExternalRefResponse: such a card has no suggestions nor selectionBehavior, and 1..* links."""
    external = [(x, c) for x, c in cards_of(exchanges) if identify_card_type(c) == "external_reference"]
    assert external, "no External Reference card in the fixtures"
    for x, card in external:
        assert card["links"] and all(link["type"] == "absolute" for link in card["links"]), x.name
        assert "suggestions" not in card and "selectionBehavior" not in card, x.name


def test_instructions_cards_are_valid(exchanges: list[Exchange]) -> None:
    """crd_v201_valid_instructions_card_received: a card with neither links nor suggestions. CRD 2.2
    CRDCDSHooksInstructionsResponse: suggestions 0..0, selectionBehavior 0..0, links 0..0."""
    instructions = [(x, c) for x, c in cards_of(exchanges) if identify_card_type(c) == "instructions"]
    assert instructions, "no Instructions card in the fixtures"
    for x, card in instructions:
        assert not {"links", "suggestions", "selectionBehavior"} & set(card), x.name


def test_propose_alternate_request_cards_are_valid(exchanges: list[Exchange]) -> None:
    """crd_v201_propose_alternate_request_card_validation: on a card with a suggestion that deletes and creates (or
    updates), every suggestion's actions pass actions_check: a created resource conforms to its CRD profile, a
    deleted one is a draftOrders entry with a create of its type beside it (delete_action_check). CRD 2.2
    CRDCDSHooksAlternateResponse: exactly one suggestion of exactly a delete and a create, and no links."""
    alternates = [(x, c) for x, c in cards_of(exchanges) if identify_card_type(c) == "propose_alternate_request"]
    assert alternates, "no Propose Alternate Request card in the fixtures"
    for x, card in alternates:
        refs = draft_refs(x)
        for suggestion in card["suggestions"]:
            created = [a["resource"]["resourceType"] for a in suggestion["actions"] if a["type"] == "create"]
            for action in suggestion["actions"]:
                if action["type"] in ("create", "update"):
                    assert not servicerequest_problems(action["resource"]), (x.name, action["resource"])
                if action["type"] == "update":
                    assert f"{action['resource']['resourceType']}/{action['resource']['id']}" in refs
                if action["type"] == "delete":
                    assert action["resourceId"] in refs, (x.name, action["resourceId"])
                    assert action["resourceId"].split("/")[0] in created, "a delete with no create beside it"
        [suggestion] = card["suggestions"]
        assert sorted(a["type"] for a in suggestion["actions"]) == ["create", "delete"]
        assert "links" not in card


def test_every_card_is_one_known_crd_card_type(exchanges: list[Exchange]) -> None:
    """cards_logical_model_validation.rb: a card the kit cannot categorise is checked against the base model only
    (with a warning). Each card here is one type, and its source.topic is a CRD card type in the system of the CRD
    version asked for (CRD cards.html: Card.source.topic SHALL be populated)."""
    for x, card in cards_of(exchanges):
        assert identify_card_type(card) in ("external_reference", "instructions", "propose_alternate_request")
        version = (x.request.get("extension") or {}).get("davinci-crd.requestedVersion", "2.0")
        assert card["source"]["topic"]["system"] == CARD_TYPE_SYSTEMS[version], x.name
        assert card["source"]["topic"]["code"] in CARD_TYPES


# --- coverage-information systemAction ----------------------------------------------------------------------------


def coverage_actions(exchanges: list[Exchange]) -> list[tuple[Exchange, dict[str, Any]]]:
    """crd_v201_coverage_info_system_action_received: actions on an order type whose resource carries the
    coverage-information extension."""
    return [
        (x, action)
        for x in exchanges
        for action in x.response["systemActions"]
        if action["resource"]["resourceType"] in ORDER_TYPES
        and any(e.get("url") == COVERAGE_INFO for e in action["resource"].get("extension", []))
    ]


def test_coverage_information_system_actions_are_returned_and_valid(exchanges: list[Exchange]) -> None:
    """crd_v201_coverage_info_system_action_validation: type update; the resource conforms to its CRD profile; and
    the assertion-id rules (CRD cards.html: repetitions for the same coverage share one coverage-assertion-id and
    satisfied-pa-id, repetitions for different coverages have distinct ones)."""
    found = coverage_actions(exchanges)
    assert found and {x.request["hook"] for x, _ in found} >= {"order-sign", "order-select"}
    seen_ids: set[str] = set()
    for x, action in found:
        assert action["type"] == "update"
        resource = action["resource"]
        assert not servicerequest_problems(resource), (x.name, servicerequest_problems(resource))
        assert f"ServiceRequest/{resource['id']}" in draft_refs(x)
        by_coverage: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for extension in resource["extension"]:
            if extension.get("url") == COVERAGE_INFO:
                parts = {p["url"]: p for p in extension["extension"]}
                by_coverage[parts["coverage"]["valueReference"]["reference"]].append(parts)
        ids_across: set[str] = set()
        for repetitions in by_coverage.values():
            assertion_ids = {r["coverage-assertion-id"]["valueString"] for r in repetitions}
            pa_ids = {r["satisfied-pa-id"]["valueString"] for r in repetitions if "satisfied-pa-id" in r}
            assert len(assertion_ids) == 1 and len(pa_ids) <= 1
            assert not assertion_ids & ids_across
            ids_across |= assertion_ids
        # Each call makes its own assertion: unique across the whole run, as the audit log keys on it.
        assert not ids_across & seen_ids
        seen_ids |= ids_across


def test_coverage_information_has_what_both_crd_versions_require(exchanges: list[Exchange]) -> None:
    """ext-coverage-information: coverage, covered, date and coverage-assertion-id are required; with not-covered
    there is no pa-needed (CRD 2.1+); nothing that differs between 2.0.1 and 2.2 (expiry-date, contact, detail)."""
    for x, action in coverage_actions(exchanges):
        [info] = [e for e in action["resource"]["extension"] if e.get("url") == COVERAGE_INFO]
        parts = {p["url"] for p in info["extension"]}
        assert {"coverage", "covered", "date", "coverage-assertion-id"} <= parts, x.name
        assert not parts & {"pa-needed", "expiry-date", "contact", "detail"}, x.name


def test_the_echoed_order_is_the_clients_own_but_for_the_extension(exchanges: list[Exchange]) -> None:
    """CRD cards.html (Coverage Information): the client applies the update to its draft; only the annotation may
    change, so everything else in the echoed resource is the draft as sent."""
    for x, action in coverage_actions(exchanges):
        echoed = dict(action["resource"])
        draft = source_resources(x)[f"{echoed['resourceType']}/{echoed['id']}"]
        echoed["extension"] = [e for e in echoed["extension"] if e.get("url") != COVERAGE_INFO]
        if not echoed["extension"]:
            del echoed["extension"]
        assert echoed == draft, x.name


def test_the_fixtures_cover_every_response_type(exchanges: list[Exchange]) -> None:
    """CRD cards.html: servers SHALL be able to return External Reference, Instructions and Coverage Information."""
    kinds = {identify_card_type(card) for _, card in cards_of(exchanges)}
    assert {"external_reference", "instructions", "propose_alternate_request"} <= kinds
    assert coverage_actions(exchanges)


def test_fixture_files_are_the_ones_replayed() -> None:
    names = sorted(p.name for p in Path(FIXTURES).glob("*.request.json"))
    assert any("instructions" in n for n in names) and any("order-select" in n for n in names)
