"""The Da Vinci CRD test kit's v2.2.1 server checks, replayed through the app with a local FHIR stand-in (the kit's
mock EHR).

Source: inferno-framework/davinci-crd-test-kit, lib/davinci_crd_test_kit/server/v2.2.1 (discovery/,
verify_response/, specific_coverage_responses/). Each test names the kit test it replays by its id and the CRD
2.2.1 requirement ids it verifies (hl7.fhir.us.davinci-crd_2.2.1@...). The calls are the fixtures in
fixtures/hooks/ that ask for CRD 2.2, plus the specific-coverage-response calls the kit asks a tester to supply
(technical issues, no member found, coverage not found, no active coverage).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cds_service import create_app
from cds_service.runtime import services_of

from .conftest import ROOT
from .fhir_server import FhirBehaviour, coverage, fhir_server
from .test_crd_test_kit import SERVICES

FIXTURES = ROOT / "fixtures" / "hooks"
COVERAGE_INFO = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
PRIMARY_HOOKS = ("appointment-book", "order-sign", "order-dispatch")
ORDER_TYPES = (
    "CommunicationRequest",
    "DeviceRequest",
    "MedicationRequest",
    "NutritionOrder",
    "ServiceRequest",
    "VisionPrescription",
)
# all_responses_include_coverage_information_test.rb target_resources.
TARGETS = {"appointment-book": ("Appointment",), "encounter-start": ("Encounter",)}


@dataclass
class Call:
    name: str
    request: dict[str, Any]
    status: int
    response: Any


def fixture_bodies() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(FIXTURES.glob("*.request.json")):
        body = json.loads(path.read_text())
        if body.get("extension", {}).get("davinci-crd.requestedVersion") == "2.2":
            out.append((path.name, body))
    return out


def dispatch_fixture() -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / "order-dispatch-r4-dmx-facility.request.json").read_text())
    return body


def specific(kind: str, base: str) -> dict[str, Any]:
    """The request a tester supplies for one of the kit's specific coverage response groups."""
    body = dispatch_fixture()
    body["hookInstance"] = str(uuid.uuid4())
    body["fhirServer"] = base
    prefetch = body["prefetch"]
    if kind == "technical":
        # TechnicalIssuesGroup: an invalid access token; the mock EHR answers the service's reads with a 500.
        del prefetch["coverage"]
        body["fhirAuthorization"]["access_token"] = "invalid-token"
    elif kind == "no-member-found":
        # A patient the EHR does not know: its patient prefetch comes back empty, its Coverage search too.
        body["context"]["patientId"] = "unknown-77"
        prefetch["patient"] = None
        del prefetch["coverage"]
    elif kind == "coverage-not-found":
        prefetch["coverage"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    elif kind == "no-active-coverage":
        prefetch["coverage"]["entry"][0]["resource"]["status"] = "cancelled"
    return body


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Call]]]:
    """Every call, by the kit group it belongs to ('hooks', or a specific coverage response group)."""
    folder = tmp_path_factory.mktemp("kit22")
    # The specific coverage response groups run in a session of their own (the kit runs them as groups), so the
    # Coverage that the fixtures' encounter-start kept is not in their process.
    apps = {
        group: create_app(
            {"AUTH": "off", "ALLOW_HTTP_FHIR": True, "DATABASE_URL": f"sqlite:///{folder / f'{group}.db'}"}
        )
        for group in ("hooks", "specific")
    }
    out: dict[str, list[Call]] = defaultdict(list)

    def post(group: str, name: str, body: dict[str, Any]) -> None:
        client = apps["hooks" if group == "hooks" else "specific"].test_client()
        response = client.post(f"/cds-services/{SERVICES[body['hook']]}", json=body)
        out[group].append(Call(name, body, response.status_code, response.get_json()))

    with fhir_server(FhirBehaviour(coverages=[coverage("cov-ppo-12", patient="4f2a91")])) as (base, behaviour):
        for name, body in fixture_bodies():
            if "fhirServer" in body:
                body["fhirServer"] = base
            post("hooks", name, body)
        for kind in ("no-member-found", "coverage-not-found", "no-active-coverage"):
            post(kind, kind, specific(kind, base))
        behaviour.token = "the-valid-token"  # the technical group's token is not it
        behaviour.failing = {"Coverage": 500, "ServiceRequest": 500}
        post("technical", "technical", specific("technical", base))
    yield out
    for app in apps.values():
        services_of(app).store.close()


@pytest.fixture(scope="module")
def discovery(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('d22') / 'd.db'}"})
    services: list[dict[str, Any]] = app.test_client().get("/cds-services").get_json()["services"]
    services_of(app).store.close()
    return services


def coverage_actions(call: Call) -> list[dict[str, Any]]:
    """coverage_information_system_action_received_test: update actions whose resource carries the extension."""
    return [
        a
        for a in call.response["systemActions"]
        if a.get("type") == "update" and any(e.get("url") == COVERAGE_INFO for e in a["resource"].get("extension", []))
    ]


def infos(action: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {p["url"]: p for p in e["extension"]} for e in action["resource"]["extension"] if e.get("url") == COVERAGE_INFO
    ]


def source(call: Call, kind: str, rid: str) -> dict[str, Any] | None:
    """hook_request_resource_resolution.rb find_action_source_resource: the hook's context, then prefetch."""
    context = call.request["context"]
    for bundle in (context.get("draftOrders"), context.get("appointments"), *call.request.get("prefetch", {}).values()):
        if not isinstance(bundle, dict):
            continue
        resources = (
            [e["resource"] for e in bundle.get("entry", [])] if bundle.get("resourceType") == "Bundle" else [bundle]
        )
        for resource in resources:
            if resource.get("resourceType") == kind and resource.get("id") == rid:
                return resource
    return None


def normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((normalise(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    return value


def strip(resource: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    out["extension"] = [e for e in out.get("extension", []) if e.get("url") != COVERAGE_INFO]
    if not out["extension"]:
        del out["extension"]
    return out


def reason_codes(info: dict[str, Any]) -> list[str]:
    return [c["code"] for c in info["reason"]["valueCodeableConcept"].get("coding", [])]


# --- discovery -----------------------------------------------------------------------------------------------------


def test_discovery_declares_versions_and_configuration_for_primary_hooks(discovery: list[dict[str, Any]]) -> None:
    """crd_v221_discovery_services_validation (dev-1, dev-2: davinci-crd.version) and crd_v221_discovery_configuration
    (dev-4..8: each primary hook's service offers coverage-info; code, name, description strings, unique)."""
    hooks = {s["hook"] for s in discovery}
    assert set(PRIMARY_HOOKS) <= hooks and "encounter-start" in hooks
    for service in discovery:
        assert "2.2" in service["extension"]["davinci-crd.version"]
        options = service["extension"]["davinci-crd.configuration-options"]
        for key in ("code", "name", "description"):
            assert all(isinstance(o[key], str) for o in options)
            assert len({o[key] for o in options}) == len(options)
        assert all({"code", "type", "name", "description", "default"} <= set(o) for o in options)
        if service["hook"] in PRIMARY_HOOKS:
            assert any(o["code"] == "coverage-info" for o in options), service["id"]


STANDARD = {
    "patient": "Patient/{{context.patientId}}",
    "coverage": "Coverage?patient={{context.patientId}}&status=active",
}


def test_discovery_prefetch_uses_the_standard_expressions(discovery: list[dict[str, Any]]) -> None:
    """crd_v221_discovery_standard_prefetch_expressions (found-29): every advertised expression is one of the
    standard CRD expressions for its hook."""
    standard = {
        "order-dispatch": {
            **STANDARD,
            "serviceRequests": "ServiceRequest?_id={{context.dispatchedOrders.resolve().ofType(ServiceRequest).id}}",
        },
        "appointment-book": {
            **STANDARD,
            "serviceRequests": "ServiceRequest?_id={{context.appointments.entry.resource.basedOn.resolve()"
            ".ofType(ServiceRequest).id}}",
        },
    }
    for service in discovery:
        expressions = set(standard.get(service["hook"], STANDARD).values())
        assert set(service["prefetch"].values()) <= expressions, service["id"]


# --- every hook's responses -----------------------------------------------------------------------------------------


def test_the_fixtures_exercise_every_primary_hook_and_encounter_start(calls: dict[str, list[Call]]) -> None:
    assert {c.request["hook"] for c in calls["hooks"]} >= {*PRIMARY_HOOKS, "encounter-start"}
    assert all(c.status == 200 for group in calls.values() for c in group)


def test_coverage_information_system_actions_are_valid(calls: dict[str, list[Call]]) -> None:
    """crd_v221_coverage_info_system_action_validation (resp-32, resp-37): type update; repetitions about one
    coverage share one coverage-assertion-id, about different coverages do not; nothing but coverage-information
    changed (the kit's normalised comparison), or only the extension is sent for a resource never seen."""
    actions = [(c, a) for group in calls.values() for c in group for a in coverage_actions(c)]
    assert actions
    for call, action in actions:
        resource = action["resource"]
        by_coverage: dict[Any, set[str]] = defaultdict(set)
        for info in infos(action):
            by_coverage[info["coverage"]["valueReference"].get("reference")].add(
                info["coverage-assertion-id"]["valueString"]
            )
        assert all(len(ids) == 1 for ids in by_coverage.values()), call.name
        assert len({i for ids in by_coverage.values() for i in ids}) == len(by_coverage), call.name
        original = source(call, resource["resourceType"], resource["id"])
        if original is None:
            assert set(strip(resource)) <= {"resourceType", "id", "meta"}, call.name
        else:
            assert normalise(strip(original)) == normalise(strip(resource)), call.name


def test_every_call_about_a_flagged_order_includes_coverage_information(calls: dict[str, list[Call]]) -> None:
    """crd_v221_all_responses_include_coverage_information / crd_v221_order_dispatch_coverage_information (resp-23,
    resp-29): each primary hook call whose orders carry no coverage-information yet, and which this policy flags,
    gets a Coverage Information action. For appointment-book the kit counts only Appointment updates; CRD cards.md
    (FHIR-50318) puts the update of an Appointment basedOn a ServiceRequest on the ServiceRequest, which is checked
    here."""
    for call in calls["hooks"]:
        hook = call.request["hook"]
        if hook not in PRIMARY_HOOKS or not call.response["cards"]:
            continue
        targets = TARGETS.get(hook, ORDER_TYPES)
        kinds = {a["resource"]["resourceType"] for a in coverage_actions(call)}
        if hook == "appointment-book":
            appointments = call.request["context"]["appointments"]["entry"]
            based = any(e["resource"].get("basedOn") for e in appointments)
            targets = ("ServiceRequest",) if based else targets
        assert kinds & set(targets), call.name


def test_coverage_information_is_never_a_card(calls: dict[str, list[Call]]) -> None:
    """crd_v221_coverage_information_card_absence (resp-25): no card suggestion only adds coverage-information."""
    for group in calls.values():
        for call in group:
            for card in call.response["cards"]:
                for suggestion in card.get("suggestions", []):
                    for action in suggestion["actions"]:
                        resource = action.get("resource") or {}
                        assert not any(e.get("url") == COVERAGE_INFO for e in resource.get("extension", []))


def test_encounter_start_returns_no_cards(calls: dict[str, list[Call]]) -> None:
    """The kit's encounter-start group: a valid response; CRD ops-1 (payer caching)."""
    starts = [c for c in calls["hooks"] if c.request["hook"] == "encounter-start"]
    assert starts and all(c.response == {"cards": [], "systemActions": []} for c in starts)


# --- the specific coverage responses ------------------------------------------------------------------------------


def test_technical_issues_are_indeterminate_with_a_technical_reason(calls: dict[str, list[Call]]) -> None:
    """crd_v221_coverage_info_technical_issues (resp-43): every coverage-information is indeterminate, reason coded
    technical, with details in reason.text."""
    [call] = calls["technical"]
    actions = coverage_actions(call)
    assert actions
    for action in actions:
        for info in infos(action):
            assert info["covered"]["valueCode"] == "indeterminate"
            assert "technical" in reason_codes(info)
            assert info["reason"]["valueCodeableConcept"]["text"]
            assert info["reason"]["valueCodeableConcept"]["coding"][0]["system"] == TEMP


@pytest.mark.parametrize(
    ("group", "codes", "requirement"),
    [
        ("no-member-found", {"no-member-found"}, "resp-44"),
        ("coverage-not-found", {"coverage-not-found"}, "resp-45"),
        ("no-active-coverage", {"no-active-coverage"}, "resp-45"),
    ],
)
def test_unresolved_member_or_coverage_is_not_covered_with_its_reason(
    calls: dict[str, list[Call]], group: str, codes: set[str], requirement: str
) -> None:
    """crd_v221_coverage_info_reason in NoMemberFoundGroup (resp-44), CoverageNotFoundGroup and
    NoActiveCoverageGroup (resp-45), and crd_v221_coverage_info_unresolved_coverage (resp-45): not-covered, with
    the expected reason code (and text)."""
    [call] = calls[group]
    actions = coverage_actions(call)
    assert actions, requirement
    for action in actions:
        for info in infos(action):
            assert info["covered"]["valueCode"] == "not-covered", requirement
            assert set(reason_codes(info)) & codes, requirement
            assert info["reason"]["valueCodeableConcept"]["text"]


# --- configuration and tolerance ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tolerance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, Call, Call]]]:
    """Each fixture call as sent, and again with what the kit's tolerance tests add."""
    folder = tmp_path_factory.mktemp("tol22")
    app = create_app({"AUTH": "off", "ALLOW_HTTP_FHIR": True, "DATABASE_URL": f"sqlite:///{folder / 't.db'}"})
    client = app.test_client()
    out = []
    with fhir_server() as (base, _):
        for name, body in fixture_bodies():
            if "fhirServer" in body:
                body["fhirServer"] = base
            plain = client.post(f"/cds-services/{SERVICES[body['hook']]}", json=body)
            for variant in ("configuration", "context", "elements", "coverage-info-false"):
                changed = copy.deepcopy(body)
                extension = changed.setdefault("extension", {})
                configuration = extension.setdefault("davinci-crd.configuration", {})
                if variant == "configuration":
                    configuration.update({"unknown-option": True, "another": {"x": 1}})
                elif variant == "context":
                    changed["context"]["unknownContextValue"] = "something"
                elif variant == "elements":
                    changed["unknownElement"] = {"value": 1}
                else:
                    configuration["coverage-info"] = False
                response = client.post(f"/cds-services/{SERVICES[body['hook']]}", json=changed)
                out.append(
                    (
                        variant,
                        Call(name, body, plain.status_code, plain.get_json()),
                        Call(name, changed, response.status_code, response.get_json()),
                    )
                )
    yield out
    services_of(app).store.close()


def test_unknown_configuration_context_and_elements_are_ignored(tolerance: list[tuple[str, Call, Call]]) -> None:
    """crd_v221_unknown_configuration (dev-4..17, hook-23), crd_v221_unknown_context (found-33) and
    crd_v221_unknown_cds_hooks_elements: a normal 200 with the same answer."""
    for variant, plain, changed in tolerance:
        if variant == "coverage-info-false":
            continue
        assert changed.status == 200, (variant, changed.name)
        assert len(changed.response["cards"]) == len(plain.response["cards"]), (variant, changed.name)
        assert len(changed.response["systemActions"]) == len(plain.response["systemActions"]), (variant, changed.name)


def test_coverage_info_false_returns_no_coverage_information(tolerance: list[tuple[str, Call, Call]]) -> None:
    """crd_v221_coverage_info_configuration (dev-9 and resp-24's configuration): with coverage-info false, no
    Coverage Information system action, on every hook; the cards stay."""
    checked = [(plain, changed) for variant, plain, changed in tolerance if variant == "coverage-info-false"]
    assert any(coverage_actions(plain) for plain, _ in checked)
    for plain, changed in checked:
        assert changed.status == 200 and not coverage_actions(changed), changed.name
        assert len(changed.response["cards"]) == len(plain.response["cards"])


def test_the_replayed_fixture_files_exist() -> None:
    names = [name for name, _ in fixture_bodies()]
    assert any(n.startswith("order-dispatch") for n in names) and any(n.startswith("appointment-book") for n in names)
    assert all(Path(FIXTURES / n.replace(".request.", ".response.")).exists() for n in names)
