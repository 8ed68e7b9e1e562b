"""Feedback items, stored durably before the answer, each linked to the card (and call) it concerns when known."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ..audit import Identity
from .audit_writer import clean, column_limit, insert_ignoring_duplicates
from .db import Database, StoreUnavailable, short_error
from .models import audit_card, feedback


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback entry: what the clinician did with one card."""

    card: str
    outcome: str
    outcome_timestamp: datetime  # UTC
    accepted_suggestions: tuple[str, ...] = ()
    override_system: str | None = None
    override_code: str | None = None
    override_display: str | None = None
    user_comment: str | None = None

    def dedupe_key(self, service_id: str) -> str:
        """Same service, card, outcome, suggestions, reason, comment and time: the same item, stored once."""
        canonical = orjson.dumps(
            [
                service_id,
                self.card,
                self.outcome,
                sorted(self.accepted_suggestions),
                self.override_system,
                self.override_code,
                self.user_comment,
                self.outcome_timestamp.isoformat(),
            ]
        )
        return hashlib.sha256(canonical).hexdigest()


@dataclass
class SaveResult:
    stored: int = 0
    duplicates: int = 0
    unknown_cards: list[str] = field(default_factory=list)
    stored_items: list[FeedbackItem] = field(default_factory=list)  # the items new to the store (for metrics)


def save_feedback(
    db: Database,
    ensure_schema: Callable[[], None],
    service_id: str,
    items: list[FeedbackItem],
    identity: Identity,
    recognises: Callable[[str], bool] = lambda _card: False,
) -> SaveResult:
    """Insert the items in one transaction; an item already stored (same content) is counted, not stored again.

    A card is known when the audit log has it, or when its uuid carries this service's mark (`recognises`): its
    record may still be queued in the worker that answered, and the report links the item once it lands.
    """
    ensure_schema()
    now = datetime.now(UTC)
    result = SaveResult()
    try:
        with db.engine.begin() as conn:
            uuids = sorted({item.card for item in items})
            known = dict(
                conn.execute(
                    select(audit_card.c.card_uuid, audit_card.c.call_id).where(
                        audit_card.c.card_uuid.in_(uuids), audit_card.c.service_id == service_id
                    )
                ).all()
            )
            for item in items:
                call_id = known.get(item.card)
                card_known = call_id is not None or recognises(item.card)
                row = {
                    "dedupe_key": item.dedupe_key(service_id),
                    "received_at": now,
                    "service_id": service_id,
                    "card_uuid": item.card,
                    "card_known": card_known,
                    "call_id": call_id,
                    "outcome": item.outcome,
                    "accepted_suggestions": list(item.accepted_suggestions),
                    "override_system": item.override_system,
                    "override_code": item.override_code,
                    "override_display": item.override_display,
                    "user_comment": item.user_comment,
                    "outcome_timestamp": item.outcome_timestamp,
                    "iss": identity.iss,
                    "tenant": identity.tenant,
                }
                row = {name: clean(value, column_limit(feedback, name)) for name, value in row.items()}
                added = conn.execute(
                    insert_ignoring_duplicates(feedback, db.backend).values(**row).returning(feedback.c.id)
                ).first()
                if added:
                    result.stored += 1
                    result.stored_items.append(item)
                else:
                    result.duplicates += 1
                if not card_known and item.card not in result.unknown_cards:
                    result.unknown_cards.append(item.card)
    except SQLAlchemyError as exc:
        raise StoreUnavailable(short_error(exc)) from exc
    return result
