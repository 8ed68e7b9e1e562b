"""Discovery, both hooks over HTTP, the card's shape, and every client error the issue lists."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from flask.testing import FlaskClient

from . import builders as b
from .conftest import SELECT, SIGN

CERVICAL = ("122494005", "Cervical spine")
LUMBAR = ("122496007", "Lumbar spine")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def post(client: FlaskClient, service: str, body: Any) -> Any:
    return client.post(f"/cds-services/{service}", json=body)


def dsv(rid: str = "dsv1", **kw: Any) -> dict[str, Any]:
    return b.service_request(rid, cpt="76496", text="Unlisted fluoroscopic procedure", body_site=CERVICAL, **kw)


# --- discovery -------------------------------------------------------------------------------------------------


def test_discovery_lists_one_service_per_hook(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = response.get_json()["services"]
    hooks = ["order-select", "order-sign", "order-dispatch", "appointment-book", "encounter-start"]
    assert sorted(s["hook"] for s in services) == sorted(hooks)
    assert len({s["id"] for s in services}) == len(services) == 5
    for service in services:
        assert service["title"] and len(service["description"]) > 80
        assert "investigational" in service["description"] and "76496" in service["description"]
        # The policy's patient and Coverage; order-dispatch and appointment-book add their serviceRequests.
        assert {k: v for k, v in service["prefetch"].items() if k != "serviceRequests"} == {
            "patient": "Patient/{{context.patientId}}",
            "coverage": "Coverage?patient={{context.patientId}}&status=active",
        }
        assert ("serviceRequests" in service["prefetch"]) == (service["hook"] in hooks[2:4])


def test_discovery_needs_no_authentication(tmp_path: Any) -> None:
    from cds_service import create_app

    app = create_app({"AUTH": "jwt", "DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}"})
    assert app.test_client().get("/cds-services").status_code == 200
    assert app.test_client().get("/health").get_json()["status"] == "ok"


# --- the card --------------------------------------------------------------------------------------------------


def test_order_sign_card_has_every_part(client: FlaskClient) -> None:
    body = b.hook_request("order-sign", [dsv(), b.medication_request()])
    response = post(client, SIGN, body)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    data = response.get_json()
    assert set(data) == {"cards", "systemActions"}
    assert data["systemActions"] == []  # no Coverage known: no coverage assertion
    [card] = data["cards"]  # one card per order by default: the Propose Alternate Request card
    assert UUID.match(card["uuid"])
    assert card["indicator"] == "warning"
    assert len(card["summary"]) < 140
    assert "investigational" in card["summary"].lower() and "flexion/extension" in card["summary"]
    detail = card["detail"]
    # What matched, first, naming the order by what was ordered (never its id); then what to do; then the policy.
    assert detail.startswith("**Unlisted fluoroscopic procedure** is dynamic spinal visualization")
    assert "CPT 76496 Unlisted fluoroscopic procedure with body site Cervical spine (SNOMED 122494005)" in detail
    assert detail.index("What to do") < detail.index("investigational")
    assert "ServiceRequest/" not in detail and "dsv1" not in detail
    assert "[evidence](https://" in detail  # the evidence is behind its link, not on the card
    source = card["source"]
    assert source["label"] and source["url"].startswith("https://")
    assert source["topic"]["code"] == "therapy-alternatives-opt" and "system" in source["topic"]
    assert "links" not in card  # CRD 2.2 CRDCDSHooksAlternateResponse: links 0..0
    assert card["selectionBehavior"] == "at-most-one"
    assert card["extension"] == {"davinci-crd.associated-resource": [{"reference": "ServiceRequest/dsv1"}]}
    reasons = card["overrideReasons"]
    assert len(reasons) >= 4 and all({"system", "code", "display"} <= set(r) for r in reasons)
    assert any("research" in r["display"].lower() for r in reasons)
    assert any("false alarm" in r["display"].lower() for r in reasons)
    # No optional field is null or empty.
    assert all(value not in (None, "", [], {}) for value in card.values())


def test_the_one_suggestion_replaces_the_order_with_flexion_extension_radiographs(client: FlaskClient) -> None:
    card = post(client, SIGN, b.hook_request("order-sign", [dsv()])).get_json()["cards"][0]
    [replace] = card["suggestions"]
    assert UUID.match(replace["uuid"]) and replace["isRecommended"] is True
    delete, create = replace["actions"]
    assert delete["type"] == "delete" and delete["resourceId"] == "ServiceRequest/dsv1" and "resource" not in delete
    assert create["type"] == "create" and create["description"]
    resource = create["resource"]
    assert resource["resourceType"] == "ServiceRequest" and resource["status"] == "draft"
    assert resource["code"]["coding"] == [
        {
            "system": "http://loinc.org",
            "code": "24945-8",
            "display": "XR Cervical spine Views W flexion and W extension",
        }
    ]
    assert resource["subject"] == {"reference": "Patient/pat-1"}
    assert resource["encounter"] == {"reference": "Encounter/enc-1"}
    assert resource["requester"] == {"reference": "Practitioner/prac-1"}
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", resource["authoredOn"])
    assert resource["id"] != "dsv1"
    assert "Unlisted fluoroscopic procedure" in resource["note"][0]["text"]


def test_lumbar_order_is_replaced_by_lumbar_radiographs(client: FlaskClient) -> None:
    order = b.service_request("l1", text="Digital motion x-ray lumbar spine")
    card = post(client, SIGN, b.hook_request("order-sign", [order])).get_json()["cards"][0]
    create = card["suggestions"][0]["actions"][1]["resource"]
    assert create["code"]["coding"][0]["code"] == "24971-4"


@pytest.mark.parametrize(
    "order",
    [
        b.service_request("u1", text="DMX study"),  # region unknown
        b.service_request("t1", text="Videofluoroscopy thoracic spine"),  # no standard alternative in the policy
        b.service_request("m1", text="DMX of the cervical and lumbar spine"),  # two regions: no single replacement
        # No requester the CRD ServiceRequest profile allows (a Practitioner or PractitionerRole), none in context.
        dsv(requester={"reference": "Organization/o"}),
    ],
)
def test_an_external_reference_card_when_no_alternative_can_be_proposed(
    client: FlaskClient, order: dict[str, Any]
) -> None:
    body = b.hook_request("order-sign", [order])
    del body["context"]["userId"]
    [card] = post(client, SIGN, body).get_json()["cards"]
    # CRD cards.html#external-reference: links, all absolute; CRD 2.2 CRDCDSHooksExternalRefResponse: no suggestions.
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert card["links"] and all(link["type"] == "absolute" for link in card["links"])
    assert card["source"]["topic"]["code"] == "guideline"
    assert "Remove this order" in card["detail"]


def test_r5_order_gets_an_r5_replacement(client: FlaskClient) -> None:
    order = b.service_request(
        "r5", text="Kinematic MRI of the cervical spine", r5=True, reason=[{"concept": {"text": "Neck pain"}}]
    )
    card = post(client, SIGN, b.hook_request("order-sign", [order])).get_json()["cards"][0]
    resource = card["suggestions"][0]["actions"][1]["resource"]
    assert resource["code"]["concept"]["coding"][0]["code"] == "24945-8"
    assert resource["reason"] == [{"concept": {"text": "Neck pain"}}]
    from fhir.resources.servicerequest import ServiceRequest

    ServiceRequest.model_validate(resource)


def test_replacement_is_a_valid_r4_service_request(client: FlaskClient) -> None:
    from fhir.resources.R4B.servicerequest import ServiceRequest

    card = post(client, SIGN, b.hook_request("order-sign", [dsv()])).get_json()["cards"][0]
    ServiceRequest.model_validate(card["suggestions"][0]["actions"][1]["resource"])


# --- hook semantics --------------------------------------------------------------------------------------------


def test_order_select_judges_only_the_selected_orders(client: FlaskClient) -> None:
    orders = [dsv("a"), dsv("b"), b.service_request("lab", text="CBC")]
    body = b.hook_request("order-select", orders, selections=["ServiceRequest/b", "ServiceRequest/lab"])
    cards = post(client, SELECT, body).get_json()["cards"]
    assert [c["extension"]["davinci-crd.associated-resource"][0]["reference"] for c in cards] == ["ServiceRequest/b"]


def test_order_select_without_the_dsv_order_selected_gives_no_guidance(client: FlaskClient) -> None:
    body = b.hook_request("order-select", [dsv(), b.medication_request()], selections=["MedicationRequest/med1"])
    assert post(client, SELECT, body).get_json() == {"cards": [], "systemActions": []}


def test_order_sign_judges_every_order_one_card_each(client: FlaskClient) -> None:
    orders = [dsv("a"), b.medication_request(), dsv("b"), b.service_request("x", text="MRI lumbar spine")]
    cards = post(client, SIGN, b.hook_request("order-sign", orders)).get_json()["cards"]
    refs = [c["extension"]["davinci-crd.associated-resource"][0]["reference"] for c in cards]
    assert refs == ["ServiceRequest/a", "ServiceRequest/b"]
    assert len({c["uuid"] for c in cards}) == 2


def test_same_order_listed_twice_gets_one_card(client: FlaskClient) -> None:
    cards = post(client, SIGN, b.hook_request("order-sign", [dsv(), dsv()])).get_json()["cards"]
    assert len(cards) == 1


def test_other_resource_types_are_skipped_without_complaint(client: FlaskClient) -> None:
    odd: list[dict[str, Any]] = [
        {"resourceType": "NutritionOrder", "id": "n"},
        {"resourceType": "DeviceRequest", "id": "d", "codeCodeableConcept": {"text": "DMX"}},
        {"resourceType": "VisionPrescription"},
        {"no": "type"},
    ]
    body = b.hook_request("order-sign", [*odd, b.medication_request()])
    assert post(client, SIGN, body).get_json() == {"cards": [], "systemActions": []}


def test_sloppy_sandbox_shapes_are_tolerated(client: FlaskClient) -> None:
    body = b.hook_request("order-sign", [dsv()])
    del body["context"]["draftOrders"]["type"]  # the sandbox sends no Bundle.type
    order = body["context"]["draftOrders"]["entry"][0]["resource"]
    order["category"] = {"text": "Imaging"}  # an object where an array belongs
    order["bodySite"] = order["bodySite"][0]  # here too, in a field the service reads
    order["note"] = "not an array"
    body["context"]["draftOrders"]["entry"].append(
        {"resource": {"resourceType": "ServiceRequest", "code": {"coding": [{}]}}}
    )
    body["context"]["draftOrders"]["entry"].append("garbage")
    response = post(client, SIGN, body)
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1


def test_half_written_order_select_does_not_fail(client: FlaskClient) -> None:
    order = {"resourceType": "ServiceRequest", "id": "h", "status": "draft", "code": {"coding": [{}]}}
    body = b.hook_request("order-select", [order], selections=["ServiceRequest/h"])
    assert post(client, SELECT, body).get_json() == {"cards": [], "systemActions": []}


# --- errors ----------------------------------------------------------------------------------------------------


def assert_outcome(response: Any, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"]
    assert fragment.lower() in issue["diagnostics"].lower()


def valid() -> dict[str, Any]:
    return b.hook_request("order-sign", [dsv()])


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda body: body.pop("hook"), "hook"),
        (lambda body: body.pop("hookInstance"), "hookInstance"),
        (lambda body: body.pop("context"), "context"),
        (lambda body: body.update(hook="order-select"), "order-sign"),
        (lambda body: body.update(hook=42), "hook"),
        (lambda body: body.update(hookInstance="not-a-uuid"), "UUID"),
        (lambda body: body.update(context=[1, 2]), "context"),
        (lambda body: body["context"].pop("draftOrders"), "draftOrders"),
        (lambda body: body["context"].update(draftOrders={"resourceType": "Patient"}), "Bundle"),
        (lambda body: body["context"].update(draftOrders=[]), "Bundle"),
    ],
)
def test_unusable_requests_are_400(client: FlaskClient, mutate: Any, fragment: str) -> None:
    body = valid()
    mutate(body)
    assert_outcome(post(client, SIGN, body), 400, fragment)


def test_order_select_without_selections_is_400(client: FlaskClient) -> None:
    body = b.hook_request("order-select", [dsv()])
    del body["context"]["selections"]
    assert_outcome(post(client, SELECT, body), 400, "selections")
    body["context"]["selections"] = {"a": 1}
    assert_outcome(post(client, SELECT, body), 400, "selections")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"', b"{", b"\xff\xfe{}", b"null"])
def test_non_json_or_non_object_bodies_are_400(client: FlaskClient, raw: bytes) -> None:
    response = client.post(f"/cds-services/{SIGN}", data=raw, content_type="application/json")
    assert_outcome(response, 400)


def test_unknown_service_is_404(client: FlaskClient) -> None:
    assert_outcome(post(client, "no-such-service", valid()), 404, "no-such-service")
    assert_outcome(client.get("/nothing/here"), 404)


def test_wrong_method_is_405_with_allow(client: FlaskClient) -> None:
    response = client.get(f"/cds-services/{SIGN}")
    assert_outcome(response, 405)
    assert "POST" in response.headers["Allow"]
    assert_outcome(client.put("/cds-services"), 405)


def test_body_over_5_mb_is_413(client: FlaskClient) -> None:
    body = valid()
    body["padding"] = "x" * (5 * 1024 * 1024)
    response = client.post(f"/cds-services/{SIGN}", data=json.dumps(body), content_type="application/json")
    assert_outcome(response, 413)


def test_jwt_mode_without_a_token_is_401(tmp_path: Any) -> None:
    from cds_service import create_app

    app = create_app({"AUTH": "jwt", "DATABASE_URL": f"sqlite:///{tmp_path / 'j.db'}"})
    response = app.test_client().post(f"/cds-services/{SIGN}", json=valid())
    assert_outcome(response, 401)
    assert response.get_json()["issue"][0]["diagnostics"] == "Unauthorized."


def test_service_responses_carry_security_headers(client: FlaskClient) -> None:
    for response in (post(client, SIGN, valid()), post(client, SIGN, {"x": 1})):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "fields",
    [
        {"intent": ["order"], "priority": {"x": 1}},
        {"extension": 5},
        {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information",
                    "extension": {"url": "coverage", "valueReference": "Coverage/c"},
                }
            ]
        },
        {"code": {"coding": [{"system": b.CPT, "code": "."}, {"system": b.CPT, "code": 76496}], "text": "DMX"}},
        {"subject": "Patient/pat-1", "requester": ["x"], "encounter": 3},
    ],
)
def test_odd_shapes_inside_a_flagged_order_never_fail(client: FlaskClient, fields: dict[str, Any]) -> None:
    order = dsv(**fields)
    prefetch = {
        "coverage": {
            "resourceType": "Bundle",
            "entry": {"resource": {"resourceType": "Coverage", "id": "c"}},
            "link": 7,
        }
    }
    response = post(client, SIGN, b.hook_request("order-sign", [order], prefetch=prefetch))
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1


def test_refused_and_oversized_calls_are_audited(app: Any, client: FlaskClient) -> None:
    seen = []
    app.extensions["cds"].audit = type("Sink", (), {"record": lambda self, call: seen.append(call)})()
    post(client, SIGN, {"hook": "order-sign"})
    client.post(f"/cds-services/{SIGN}", data=b"x" * (5 * 1024 * 1024 + 1), content_type="application/json")
    post(client, SIGN, valid())
    assert [(c.status, bool(c.error)) for c in seen] == [(400, True), (413, True), (200, False)]


def test_selections_may_be_absolute_urls(client: FlaskClient) -> None:
    body = b.hook_request(
        "order-select", [dsv("a"), dsv("b")], selections=["https://ehr.example.org/fhir/ServiceRequest/b"]
    )
    cards = post(client, SELECT, body).get_json()["cards"]
    assert [c["extension"]["davinci-crd.associated-resource"][0]["reference"] for c in cards] == ["ServiceRequest/b"]


def test_malformed_copied_reasons_are_left_out_of_the_replacement(client: FlaskClient) -> None:
    order = b.service_request(
        "r",
        text="DMX cervical spine",
        # Read as meant by the engine (a number for a system, an empty array for no code), yet not valid FHIR to
        # copy into the replacement order.
        reasonCode=[{"coding": [{"system": 5, "code": []}]}],
        category=[{"coding": {"code": "imaging"}, "text": ""}],
    )
    card = post(client, SIGN, b.hook_request("order-sign", [order])).get_json()["cards"][0]
    resource = card["suggestions"][0]["actions"][1]["resource"]
    assert "reasonCode" not in resource
    assert resource["category"][0]["coding"][0]["code"] == "363679005"
    from fhir.resources.R4B.servicerequest import ServiceRequest

    ServiceRequest.model_validate(resource)


def test_replacement_keeps_valid_copied_reasons_and_category(client: FlaskClient) -> None:
    reason = {"coding": [{"system": b.ICD10, "code": "M54.2", "display": "Cervicalgia"}]}
    category = {"coding": [{"system": b.SNOMED, "code": "363679005", "display": "Imaging"}], "text": "Radiology"}
    order = b.service_request("r", text="DMX cervical spine", reasonCode=[reason], category=[category])
    card = post(client, SIGN, b.hook_request("order-sign", [order])).get_json()["cards"][0]
    resource = card["suggestions"][0]["actions"][1]["resource"]
    assert resource["reasonCode"] == [reason] and resource["category"] == [category]


def test_client_text_cannot_inject_markdown_into_the_card(client: FlaskClient) -> None:
    order = b.service_request("m", text="DMX cervical spine [click here](https://evil.example) <img src=x>")
    detail = post(client, SIGN, b.hook_request("order-sign", [order])).get_json()["cards"][0]["detail"]
    # Escaped, the client's markdown and HTML show as text rather than render as a link or an image.
    assert not re.search(r"(?<!\\)\[click here", detail) and not re.search(r"(?<!\\)<img", detail)
    assert r"\[click here\]" in detail and r"\<img" in detail
