"""Retention: delete audit calls, their cards and feedback older than a cut-off, and expired JWT ids."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete

from .db import Database
from .models import audit_call, audit_card, feedback, jti_seen

_AGE = re.compile(r"(\d+)\s*([dhw])")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}
# Da Vinci CRD asks payers to keep hook logs for disputes; refuse cut-offs that would gut a month's report.
MIN_AGE = timedelta(days=1)


def parse_age(text: str) -> timedelta:
    """'400d', '12w', '36h' -> timedelta; ValueError with the accepted forms otherwise."""
    match = _AGE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"expected an age such as 400d, 52w or 36h, got {text!r}")
    age = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    if age < MIN_AGE:
        raise ValueError(f"refusing to purge records younger than {MIN_AGE.days} day: got {text!r}")
    return age


def purge(db: Database, older_than: timedelta, now: datetime | None = None) -> dict[str, int | str]:
    """Delete what is older than the cut-off, in one transaction; returns the counts and the cut-off."""
    cutoff = (now or datetime.now(UTC)) - older_than
    with db.engine.begin() as conn:
        cards = conn.execute(delete(audit_card).where(audit_card.c.started_at < cutoff)).rowcount
        calls = conn.execute(delete(audit_call).where(audit_call.c.started_at < cutoff)).rowcount
        items = conn.execute(delete(feedback).where(feedback.c.received_at < cutoff)).rowcount
        jtis = conn.execute(delete(jti_seen).where(jti_seen.c.expires_at < time.time())).rowcount
    return {
        "cutoff": cutoff.isoformat().replace("+00:00", "Z"),
        "calls": calls,
        "cards": cards,
        "feedback": items,
        "expiredJtis": jtis,
    }
