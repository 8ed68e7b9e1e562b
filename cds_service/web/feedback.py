"""CDS Hooks 2.0 feedback, framework-free: check the body and turn each item into a value the store keeps."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from ..errors import BadRequest
from ..store.feedback_store import FeedbackItem

OUTCOMES = ("accepted", "overridden")
MAX_ITEMS = 100
MAX_ID = 200
MAX_COMMENT = 4000
# RFC 3339 date-time (CDS Hooks 2.0: outcomeTimestamp is an ISO 8601 / RFC 3339 instant, with its offset).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def parse_feedback(body: Any) -> list[FeedbackItem]:
    """Check a decoded feedback body; BadRequest (400) names the first thing wrong and where."""
    if not isinstance(body, dict):
        raise BadRequest("The feedback body must be a JSON object with a 'feedback' array.")
    items = body.get("feedback")
    if not isinstance(items, list) or not items:
        raise BadRequest("'feedback' must be a non-empty array of feedback items.", expression="feedback")
    if len(items) > MAX_ITEMS:
        raise BadRequest(f"At most {MAX_ITEMS} feedback items per request.", expression="feedback")
    return [_item(raw, f"feedback[{i}]") for i, raw in enumerate(items)]


def _text(value: Any, where: str, *, limit: int = MAX_ID, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{where}' must be a non-empty string.", expression=where)
    if len(value) > limit:
        raise BadRequest(f"'{where}' is longer than {limit} characters.", expression=where)
    return value.strip()


def _timestamp(value: Any, where: str) -> datetime:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value.strip()):
        raise BadRequest(
            f"'{where}' must be an RFC 3339 date-time with its offset, such as 2026-05-04T10:15:00Z.",
            expression=where,
        )
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z").replace("t", "T"))
    except ValueError:
        raise BadRequest(f"'{where}' is not a valid date-time.", expression=where) from None
    return parsed.astimezone(UTC)


def _item(raw: Any, where: str) -> FeedbackItem:
    if not isinstance(raw, dict):
        raise BadRequest(f"'{where}' must be an object.", expression=where)
    if raw.get("card") is None:
        raise BadRequest(f"'{where}' has no 'card' (the uuid of the card it is about).", expression=f"{where}.card")
    card = _text(raw["card"], f"{where}.card")
    outcome = raw.get("outcome")
    if outcome not in OUTCOMES:
        raise BadRequest(
            f"'{where}.outcome' must be 'accepted' or 'overridden'.",
            expression=f"{where}.outcome",
        )
    if raw.get("outcomeTimestamp") is None:
        raise BadRequest(f"'{where}' has no 'outcomeTimestamp'.", expression=f"{where}.outcomeTimestamp")
    timestamp = _timestamp(raw["outcomeTimestamp"], f"{where}.outcomeTimestamp")
    suggestions = raw.get("acceptedSuggestions")
    reason = raw.get("overrideReason")
    assert isinstance(card, str)  # noqa: S101 - _text returns a string when required
    if outcome == "accepted":
        if reason is not None:
            raise BadRequest(
                f"'{where}': overrideReason is for outcome 'overridden' only.", expression=f"{where}.overrideReason"
            )
        return FeedbackItem(
            card=card,
            outcome=outcome,
            outcome_timestamp=timestamp,
            accepted_suggestions=_suggestions(suggestions, f"{where}.acceptedSuggestions"),
        )
    if suggestions is not None:
        raise BadRequest(
            f"'{where}': acceptedSuggestions is for outcome 'accepted' only.",
            expression=f"{where}.acceptedSuggestions",
        )
    system = code = display = comment = None
    if reason is not None:
        if not isinstance(reason, dict):
            raise BadRequest(f"'{where}.overrideReason' must be an object.", expression=f"{where}.overrideReason")
        coding = reason.get("reason")
        if coding is not None:
            path = f"{where}.overrideReason.reason"
            if not isinstance(coding, dict):
                raise BadRequest(f"'{path}' must be a Coding (system, code, display).", expression=path)
            code = _text(coding.get("code"), f"{path}.code")
            system = _text(coding.get("system"), f"{path}.system", limit=500, required=False)
            display = _text(coding.get("display"), f"{path}.display", limit=500, required=False)
        comment = _text(
            reason.get("userComment"), f"{where}.overrideReason.userComment", limit=MAX_COMMENT, required=False
        )
    return FeedbackItem(
        card=card,
        outcome=outcome,
        outcome_timestamp=timestamp,
        override_system=system,
        override_code=code,
        override_display=display,
        user_comment=comment,
    )


def _suggestions(value: Any, where: str) -> tuple[str, ...]:
    # CDS Hooks 2.0: acceptedSuggestions is required when the outcome is accepted.
    if not isinstance(value, list) or not value:
        raise BadRequest(
            f"'{where}' must list the accepted suggestions ([{{\"id\": <suggestion uuid>}}]) when the outcome is "
            "accepted.",
            expression=where,
        )
    if len(value) > 20:
        raise BadRequest(f"'{where}' lists more than 20 suggestions.", expression=where)
    ids = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise BadRequest(f"'{where}[{i}]' must be an object with an 'id'.", expression=f"{where}[{i}]")
        ident = _text(entry.get("id"), f"{where}[{i}].id")
        assert ident is not None  # noqa: S101 - required
        ids.append(ident)
    return tuple(ids)
