"""Strict where it protects the caller: inconsistent selections and unreadable order fields are a 400, never a skip."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from flask.testing import FlaskClient

from . import builders as b
from .conftest import SELECT, SIGN

CERVICAL = {"coding": [{"system": b.SNOMED, "code": "122494005", "display": "Cervical spine"}]}
PATH = "context.draftOrders.entry[0].resource"


def call(client: FlaskClient, hook: str, orders: list[dict[str, Any]], **kw: Any) -> Any:
    service = SELECT if hook == "order-select" else SIGN
    return client.post(f"/cds-services/{service}", json=b.hook_request(hook, orders, **kw))


# --- order-select: selections that name no draft order ---------------------------------------------------------


def test_selections_missing_from_draft_orders_are_a_400_naming_them(client: FlaskClient) -> None:
    orders = [b.service_request("a", text="DMX cervical spine"), b.medication_request("m")]
    response = call(client, "order-select", orders, selections=["ServiceRequest/a", "ServiceRequest/gone", "X/1"])
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["context.selections"]
    message = outcome["issue"][0]["diagnostics"]
    assert "'ServiceRequest/gone', 'X/1'" in message and "ServiceRequest/a'" not in message


@pytest.mark.parametrize(
    "selection",
    [
        "ServiceRequest/a",
        "MedicationRequest/m",  # any draft order may be selected, not only the ones this service judges
        "https://ehr.example.org/fhir/ServiceRequest/a",  # an absolute reference to a draft order
        "urn:uuid:0b6a3c61-5a3b-4c8e-9d53-2f64d3c7e0a1",  # the entry's fullUrl
    ],
)
def test_selections_that_name_a_draft_order_are_answered(client: FlaskClient, selection: str) -> None:
    body = b.hook_request(
        "order-select", [b.service_request("a", text="DMX cervical spine"), b.medication_request("m")]
    )
    body["context"]["draftOrders"]["entry"][0]["fullUrl"] = "urn:uuid:0b6a3c61-5a3b-4c8e-9d53-2f64d3c7e0a1"
    body["context"]["selections"] = [selection]
    response = client.post(f"/cds-services/{SELECT}", json=body)
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["cards"]) == (0 if selection.startswith("Medication") else 1)


def test_a_selection_that_is_not_a_reference_is_a_400_naming_it(client: FlaskClient) -> None:
    response = call(client, "order-select", [b.service_request("a", text="DMX")], selections=["ServiceRequest/a", 7])
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["context.selections[1]"]


# --- fields the engine reads, sent with the wrong JSON type ------------------------------------------------------


def dsv_by_name() -> dict[str, Any]:
    """An order flagged on its name alone (technique-named), cervical: what every tolerated variant must still be."""
    return b.service_request("t", text="Digital motion x-ray cervical spine")


def videofluoroscopy() -> dict[str, Any]:
    """Flagged only with spine evidence from another field (technique-on-spine): the variant must carry it."""
    return b.service_request("t", text="Videofluoroscopy")


def with_field(order: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(order)
    out[key] = value
    return out


TOLERATED: list[tuple[str, dict[str, Any]]] = [
    ("code as a bare string", with_field(dsv_by_name(), "code", "Digital motion x-ray cervical")),
    ("code as a one-item array", with_field(dsv_by_name(), "code", [{"text": "Digital motion x-ray cervical"}])),
    ("code.text as a one-item array", with_field(dsv_by_name(), "code", {"text": ["Digital motion x-ray cervical"]})),
    (
        "code.coding as an object",
        with_field(
            with_field(dsv_by_name(), "code", {"coding": {"system": b.CPT, "code": "76496"}, "text": "Fluoroscopy"}),
            "bodySite",
            [CERVICAL],
        ),
    ),
    (
        "coding.code as a number",
        with_field(
            with_field(dsv_by_name(), "code", {"coding": [{"system": b.CPT, "code": 76496}]}), "bodySite", [CERVICAL]
        ),
    ),
    (
        "coding.display as a one-item array",
        with_field(dsv_by_name(), "code", {"coding": [{"display": ["DMX C-spine"]}]}),
    ),
    ("R5 code.concept as a bare string", with_field(dsv_by_name(), "code", {"concept": "Digital motion x-ray neck"})),
    ("bodySite as an object", with_field(videofluoroscopy(), "bodySite", CERVICAL)),
    ("bodySite as a bare string", with_field(videofluoroscopy(), "bodySite", "cervical spine")),
    ("bodySite items as strings", with_field(videofluoroscopy(), "bodySite", ["cervical spine"])),
    ("reasonCode as a bare string", with_field(videofluoroscopy(), "reasonCode", "cervical spine instability")),
    ("reason (R5) items as strings", with_field(videofluoroscopy(), "reason", ["cervical spine instability"])),
    ("orderDetail as a bare string", with_field(b.service_request("t", text="Imaging"), "orderDetail", "DMX cervical")),
    ("note as a bare string", with_field(videofluoroscopy(), "note", "cervical spine")),
    ("note items as strings", with_field(videofluoroscopy(), "note", ["cervical spine"])),
    ("note.text as a one-item array", with_field(videofluoroscopy(), "note", [{"text": ["cervical spine"]}])),
    (
        "patientInstruction as an object",
        with_field(videofluoroscopy(), "patientInstruction", {"text": "neck (C-spine)"}),
    ),
    ("id as a number", with_field(dsv_by_name(), "id", 17)),
    ("status as a one-item array", with_field(dsv_by_name(), "status", ["draft"])),
    ("intent as a one-item array", with_field(dsv_by_name(), "intent", ["order"])),
    ("doNotPerform as the string false", with_field(dsv_by_name(), "doNotPerform", "false")),
    ("category as a bare string", with_field(dsv_by_name(), "category", "Imaging")),
    ("performerType as a bare string", with_field(dsv_by_name(), "performerType", "Radiology")),
    ("fields sent as null", with_field(with_field(dsv_by_name(), "bodySite", None), "note", None)),
]


@pytest.mark.parametrize(("case", "order"), TOLERATED, ids=[case for case, _ in TOLERATED])
@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
def test_slips_are_read_as_the_well_formed_order_would_be(
    client: FlaskClient, hook: str, case: str, order: dict[str, Any]
) -> None:
    selections = [f"ServiceRequest/{order['id']}"] if hook == "order-select" else None
    response = call(client, hook, [order], selections=selections)
    assert response.status_code == 200, (case, response.get_json())
    [card] = response.get_json()["cards"]
    assert card["extension"]["davinci-crd.associated-resource"] == [{"reference": f"ServiceRequest/{order['id']}"}]


def test_a_bare_string_code_flags_like_its_concept(client: FlaskClient) -> None:
    bare = with_field(dsv_by_name(), "code", "Digital motion x-ray cervical")
    well_formed = with_field(dsv_by_name(), "code", {"text": "Digital motion x-ray cervical"})
    cards = [call(client, "order-sign", [order]).get_json()["cards"] for order in (bare, well_formed)]
    assert [c["source"]["topic"]["code"] for c in cards[0]] == [c["source"]["topic"]["code"] for c in cards[1]]
    assert cards[0][0]["detail"] == cards[1][0]["detail"]


def test_do_not_perform_as_the_string_true_is_read_as_true(client: FlaskClient) -> None:
    # The well-formed doNotPerform: true is not an order for the study; the string must not make it one.
    for value in (True, "true"):
        response = call(client, "order-sign", [with_field(dsv_by_name(), "doNotPerform", value)])
        assert response.status_code == 200 and response.get_json()["cards"] == [], value


REFUSED: list[tuple[str, Any, str]] = [
    ("code", ["Digital motion x-ray", "cervical"], f"{PATH}.code"),
    ("code", True, f"{PATH}.code"),
    ("code", {"coding": "Digital motion x-ray cervical"}, f"{PATH}.code.coding"),
    ("code", {"coding": [{"system": {"url": b.CPT}, "code": "76496"}]}, f"{PATH}.code.coding[0].system"),
    ("code", {"text": False}, f"{PATH}.code.text"),
    ("bodySite", 5, f"{PATH}.bodySite"),
    ("bodySite", [{"text": {"value": "cervical"}}], f"{PATH}.bodySite[0].text"),
    ("reasonCode", [{"coding": ["M54.2"]}], f"{PATH}.reasonCode[0].coding[0]"),
    ("note", [7.5, True], f"{PATH}.note[1]"),
    ("orderDetail", True, f"{PATH}.orderDetail"),
    ("id", {"value": "t"}, f"{PATH}.id"),
    ("status", ["draft", "active"], f"{PATH}.status"),
    ("intent", {"code": "order"}, f"{PATH}.intent"),
    ("doNotPerform", "no", f"{PATH}.doNotPerform"),
    ("category", [False], f"{PATH}.category[0]"),
    ("patientInstruction", True, f"{PATH}.patientInstruction"),
]


@pytest.mark.parametrize(("key", "value", "path"), REFUSED, ids=[f"{k}={v!r}"[:50] for k, v, _ in REFUSED])
def test_what_cannot_be_read_as_meant_is_a_400_naming_its_path(
    client: FlaskClient, key: str, value: Any, path: str
) -> None:
    response = call(client, "order-sign", [with_field(dsv_by_name(), key, value)])
    assert response.status_code == 400, response.get_json()
    [issue] = response.get_json()["issue"]
    assert issue["expression"] == [path] and path in issue["diagnostics"]


def test_orders_that_are_not_judged_are_not_checked(client: FlaskClient) -> None:
    # An unselected order on order-select is context only: its fields are not read, so not refused.
    other = with_field(b.service_request("o", text="CBC"), "code", True)
    response = call(client, "order-select", [dsv_by_name(), other], selections=["ServiceRequest/t"])
    assert response.status_code == 200 and len(response.get_json()["cards"]) == 1
