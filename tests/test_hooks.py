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
    assert {s["hook"] for s in services} == {"order-select", "order-sign"}
    assert len({s["id"] for s in services}) == len(services) == 2
    for service in services:
        assert service["title"] and len(service["description"]) > 80
        assert "investigational" in service["description"] and "76496" in service["description"]
        assert service["prefetch"] == {
            "patient": "Patient/{{context.patientId}}",
            "coverage": "Coverage?patient={{context.patientId}}&status=active",
        }


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
