"""CDS Hooks feedback: the body checked (400 with an OperationOutcome), items linked to their card, unknown cards
stored and flagged, the same item stored once, nothing answered 200 before it is stored."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.errors import BadRequest
from cds_service.runtime import services_of
from cds_service.store.models import feedback
from cds_service.web.feedback import parse_feedback

from .conftest import SELECT, SIGN
from .jwt_support import EHR, PUBLIC_URL, SIGN_URL, bearer, claims, ec_key, issuers_file, jwks, token
from .store_support import flagged_call, table_rows

WHEN = "2026-11-02T10:15:00Z"
TS = "feedback[0].outcomeTimestamp"
OUTCOME = "feedback[0].outcome"
BOTH = "'accepted' or 'overridden'"


@pytest.fixture
def app(store_app: Flask) -> Flask:
    """The store tests' app runs on each backend (conftest's `client` then calls it)."""
    return store_app


def accepted(card: str, *suggestions: str, at: str = WHEN) -> dict[str, Any]:
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": s} for s in suggestions],
        "outcomeTimestamp": at,
    }


def overridden(card: str, code: str | None = "not-dsv", comment: str | None = None, at: str = WHEN) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": at}
    reason: dict[str, Any] = {}
    if code:
        reason["reason"] = {
            "system": "https://cds.example.org/fhir/CodeSystem/dsv-override-reason",
            "code": code,
            "display": "Not a dynamic spinal study (false alarm)",
        }
    if comment:
        reason["userComment"] = comment
    if reason:
        item["overrideReason"] = reason
    return item


def shown_card(client: FlaskClient, service: str = SIGN) -> dict[str, Any]:
    body = flagged_call("lumbar")
    if service == SELECT:
        body["hook"] = "order-select"
        body["context"]["selections"] = ["ServiceRequest/sr1"]
    response = client.post(f"/cds-services/{service}", json=body)
    assert response.status_code == 200
    card: dict[str, Any] = response.get_json()["cards"][0]
    return card


# -- the body ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message", "expression"),
    [
        ([], "JSON object", None),
        ({}, "non-empty array", "feedback"),
        ({"feedback": []}, "non-empty array", "feedback"),
        ({"feedback": ["x"]}, "must be an object", "feedback[0]"),
        ({"feedback": [{"outcome": "accepted", "outcomeTimestamp": WHEN}]}, "has no 'card'", "feedback[0].card"),
        ({"feedback": [{**overridden("c"), "card": ""}]}, "non-empty string", "feedback[0].card"),
        (
            {"feedback": [{**overridden("c"), "outcome": "ignored"}]},
            "'accepted' or 'overridden'",
            "feedback[0].outcome",
        ),
        ({"feedback": [{**overridden("c"), "outcome": None}]}, BOTH, OUTCOME),
        (
            {"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": WHEN}]},
            "must list the accepted suggestions",
            "feedback[0].acceptedSuggestions",
        ),
        ({"feedback": [accepted("c")]}, "must list the accepted suggestions", "feedback[0].acceptedSuggestions"),
        (
            {"feedback": [{**accepted("c", "s"), "acceptedSuggestions": [{"uuid": "s"}]}]},
            "non-empty string",
            "feedback[0].acceptedSuggestions[0].id",
        ),
        ({"feedback": [overridden("c", at="2026-11-02")]}, "RFC 3339", TS),
        ({"feedback": [overridden("c", at="2026-11-02T10:15:00")]}, "RFC 3339", TS),
        ({"feedback": [overridden("c", at="yesterday")]}, "RFC 3339", TS),
        (
            {"feedback": [overridden("c", at="2026-13-40T10:15:00Z")]},
            "not a valid date-time",
            TS,
        ),
        (
            {"feedback": [{**overridden("c"), "outcomeTimestamp": 1700000000}]},
            "RFC 3339",
            TS,
        ),
        (
            {"feedback": [{"card": "c", "outcome": "overridden"}]},
            "no 'outcomeTimestamp'",
            TS,
        ),
        (
            {"feedback": [{**overridden("c"), "acceptedSuggestions": [{"id": "s"}]}]},
            "for outcome 'accepted' only",
            "feedback[0].acceptedSuggestions",
        ),
        (
            {"feedback": [{**accepted("c", "s"), "overrideReason": {"userComment": "x"}}]},
            "for outcome 'overridden' only",
            "feedback[0].overrideReason",
        ),
        (
            {"feedback": [{**overridden("c"), "overrideReason": "no"}]},
            "must be an object",
            "feedback[0].overrideReason",
        ),
        (
            {"feedback": [{**overridden("c"), "overrideReason": {"reason": {"display": "x"}}}]},
            "non-empty string",
            "feedback[0].overrideReason.reason.code",
        ),
        (
            {"feedback": [overridden("c", comment="x" * 4001)]},
            "longer than 4000",
            "feedback[0].overrideReason.userComment",
        ),
        ({"feedback": [overridden("c")] * 101}, "At most 100", "feedback"),
        ({"feedback": [overridden("c"), {"card": "d"}]}, "'accepted' or 'overridden'", "feedback[1].outcome"),
    ],
)
def test_bad_bodies_are_refused_with_what_is_wrong(body: Any, message: str, expression: str | None) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_feedback(body)
    assert message in caught.value.message
    assert caught.value.expression == expression


def test_a_good_body_is_read() -> None:
    items = parse_feedback(
        {
            "feedback": [
                accepted("c1", "s1", at="2026-11-02T12:15:00+02:00"),
                overridden("c2", comment="  MRI of the knee, not the spine  "),
                overridden("c3", code=None),
            ]
        }
    )
    assert items[0].outcome_timestamp == datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    assert items[0].accepted_suggestions == ("s1",)
    assert items[1].override_code == "not-dsv" and items[1].user_comment == "MRI of the knee, not the spine"
    assert items[2].override_code is None and items[2].user_comment is None
    assert items[0].dedupe_key(SIGN) != items[0].dedupe_key(SELECT)
    assert parse_feedback({"feedback": [accepted("c1", "s1", at="2026-11-02T10:15:00Z")]})[0].dedupe_key(SIGN) == (
        items[0].dedupe_key(SIGN)  # the same instant written with another offset is the same item
    )


# -- the endpoint --------------------------------------------------------------------------------------------------


def test_a_bad_body_gets_400_with_an_operation_outcome(app: Flask, client: FlaskClient, db_url: str) -> None:
    services_of(app).store.upgrade()
    for body in ({"feedback": [{"card": "c", "outcome": "maybe", "outcomeTimestamp": WHEN}]}, b"not json"):
        if isinstance(body, bytes):
            response = client.post(f"/cds-services/{SIGN}/feedback", data=body, content_type="application/json")
        else:
            response = client.post(f"/cds-services/{SIGN}/feedback", json=body)
        assert response.status_code == 400
        outcome = response.get_json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "invalid"
    assert table_rows(db_url, feedback) == []


def test_unknown_service_is_404(client: FlaskClient) -> None:
    response = client.post("/cds-services/no-such-service/feedback", json={"feedback": [overridden("c")]})
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_feedback_is_linked_to_its_card_and_stored_once(client: FlaskClient, db_url: str) -> None:
    card = shown_card(client)
    [switch] = (s["uuid"] for s in card["suggestions"])
    body = {"feedback": [accepted(card["uuid"], switch)]}
    first = client.post(f"/cds-services/{SIGN}/feedback", json=body)
    assert first.status_code == 200
    assert first.get_json() == {"stored": 1, "duplicates": 0, "unknownCards": []}
    again = client.post(f"/cds-services/{SIGN}/feedback", json=body)
    assert again.get_json() == {"stored": 0, "duplicates": 1, "unknownCards": []}
    [row] = table_rows(db_url, feedback)
    assert row.card_uuid == card["uuid"] and row.card_known is True and row.call_id
    assert row.outcome == "accepted" and row.accepted_suggestions == [switch]
    assert row.outcome_timestamp == datetime(2026, 11, 2, 10, 15, tzinfo=UTC)
    # Same card, a different item (a later override): stored too; the same item twice in one POST: once.
    later = overridden(card["uuid"], comment="patient in the KineGraph trial", at="2026-11-02T11:00:00Z")
    again_accepted = accepted(card["uuid"], switch, at="2026-11-02T12:00:00Z")
    third = client.post(f"/cds-services/{SIGN}/feedback", json={"feedback": [later, later, again_accepted]})
    assert third.get_json() == {"stored": 2, "duplicates": 1, "unknownCards": []}
    assert len(table_rows(db_url, feedback)) == 3


def test_unknown_cards_are_stored_and_flagged(client: FlaskClient, db_url: str) -> None:
    card = shown_card(client, SELECT)
    # A uuid never shown, and a card shown by another service: neither is linked.
    body = {"feedback": [overridden("never-shown-uuid", comment="odd"), overridden(card["uuid"])]}
    response = client.post(f"/cds-services/{SIGN}/feedback", json=body)
    assert response.status_code == 200
    assert response.get_json() == {"stored": 2, "duplicates": 0, "unknownCards": ["never-shown-uuid", card["uuid"]]}
    stored = {r.card_uuid: r for r in table_rows(db_url, feedback)}
    assert stored["never-shown-uuid"].card_known is False and stored["never-shown-uuid"].call_id is None
    assert stored["never-shown-uuid"].user_comment == "odd"
    assert stored[card["uuid"]].card_known is False


def test_the_card_answered_a_moment_ago_is_linked(client: FlaskClient, app: Flask, db_url: str) -> None:
    # The card's audit record may still be queued when its feedback arrives: the endpoint writes it first.
    services_of(app).store.writer.batch_window = 30.0
    card = shown_card(client)
    response = client.post(f"/cds-services/{SIGN}/feedback", json={"feedback": [overridden(card["uuid"])]})
    assert response.get_json()["unknownCards"] == []
    assert table_rows(db_url, feedback)[0].card_known is True


def test_feedback_needs_a_jwt_for_its_own_url(db_url: str, tmp_path: Path) -> None:
    key = ec_key()
    issuers = issuers_file(tmp_path / "issuers.json", [{"iss": EHR, "jwks": jwks(key)}])
    app = create_app({"AUTH": "jwt", "TRUSTED_ISSUERS": str(issuers), "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": db_url})
    client = app.test_client()
    url = f"/cds-services/{SIGN}/feedback"
    body = {"feedback": [overridden("c")]}
    good = token(key, claims(f"{PUBLIC_URL}{url}", tenant="clinic-7"))
    assert client.post(url, json=body, headers=bearer(good)).status_code == 200
    [row] = table_rows(db_url, feedback)
    assert (row.iss, row.tenant) == (EHR, "clinic-7")
    # Replayed, minted for the hook service's URL instead, or missing: 401, nothing more stored.
    assert client.post(url, json=body, headers=bearer(good)).status_code == 401
    assert client.post(url, json=body, headers=bearer(token(key, claims(SIGN_URL)))).status_code == 401
    assert client.post(url, json=body).status_code == 401
    assert len(table_rows(db_url, feedback)) == 1
    services_of(app).store.close()
