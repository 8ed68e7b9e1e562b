"""What one service call leaves in the audit log (who called, what was judged), and the sink that stores it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .engine.outcome import ActionRecord, CardRecord, VerdictRecord

if TYPE_CHECKING:
    from .engine import Outcome

# The typed parts are turned into JSON only where a record is written (database, journal, spill file).
JSON_PARTS = ("orders", "cards", "system_actions")


@dataclass(frozen=True)
class StoredParts:
    """A record's typed parts as the JSON they are stored as."""

    orders: orjson.Fragment
    cards: orjson.Fragment
    system_actions: orjson.Fragment


@dataclass
class CallRecord:
    """One hook call as the audit log keeps it: never the JWT, never the FHIR access token."""

    service_id: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    hook: str | None = None
    hook_instance: str | None = None
    iss: str | None = None
    tenant: str | None = None
    jti: str | None = None
    user_id: str | None = None
    patient_id: str | None = None
    orders: list[VerdictRecord] = field(default_factory=list)
    cards: list[CardRecord] = field(default_factory=list)
    system_actions: list[ActionRecord] = field(default_factory=list)
    coverage_assertions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: int = 200
    error: str | None = None
    duration_ms: float = 0.0
    # The typed parts as stored JSON, encoded once for the journal line and the database row alike (not stored).
    _parts_json: StoredParts | None = field(default=None, init=False, repr=False, compare=False)

    def answered(self, outcome: Outcome) -> None:
        """What the clinician was told: each judged order's verdict and rule, the cards, the CRD actions."""
        self._parts_json = None
        self.orders = outcome.verdict_records()
        self.cards = [card.summary() for card in outcome.cards]
        self.system_actions = [action.summary() for action in outcome.system_actions]
        self.coverage_assertions = outcome.coverage_assertions
        self.notes = outcome.notes

    def json_parts(self) -> dict[str, orjson.Fragment]:
        """The typed parts as the database columns, journal and spill lines store them: encoded once per record (the
        journal line and the database row embed the same bytes; orjson writes a Fragment as it is)."""
        if self._parts_json is None:
            self._parts_json = StoredParts(
                orders=orjson.Fragment(orjson.dumps([o.to_json() for o in self.orders])),
                cards=orjson.Fragment(orjson.dumps([c.to_json() for c in self.cards])),
                system_actions=orjson.Fragment(orjson.dumps([a.to_json() for a in self.system_actions])),
            )
        parts = self._parts_json
        return {"orders": parts.orders, "cards": parts.cards, "system_actions": parts.system_actions}

    def stored_fields(self) -> dict[str, Any]:
        """Every field the audit log stores, the typed parts as their JSON."""
        return {name: getattr(self, name) for name in STORED_FIELDS} | self.json_parts()

    @staticmethod
    def parts_from_json(fields: dict[str, Any]) -> dict[str, Any]:
        """Stored JSON parts read back into typed ones (what is not a record is dropped); other fields untouched."""
        orders = [v for v in (VerdictRecord.from_json(o) for o in _list(fields.get("orders"))) if v is not None]
        cards = [c for c in (CardRecord.from_json(o) for o in _list(fields.get("cards"))) if c is not None]
        actions = [a for a in (ActionRecord.from_json(o) for o in _list(fields.get("system_actions"))) if a is not None]
        return fields | {"orders": orders, "cards": cards, "system_actions": actions}

    def failed(self, status: int, reason: str) -> None:
        """A refused or failed call: its status and why (a reason set earlier, such as a 401's, is kept)."""
        self.status = status
        self.error = self.error or reason


# The fields a record is stored with (journal and spill lines name exactly these).
STORED_FIELDS = tuple(f.name for f in fields(CallRecord) if not f.name.startswith("_"))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class Identity:
    """Who called: safe to log and audit (never the token itself)."""

    iss: str | None = None
    kid: str | None = None
    jti: str | None = None
    tenant: str | None = None
    sub: str | None = None


class AuditSink(Protocol):
    def record(self, call: CallRecord) -> None:
        """Queue or store the record; must not raise and must not slow the hook."""
        ...


class NullAudit:
    """No audit log (CDS_AUDIT=false): records are dropped."""

    def record(self, call: CallRecord) -> None:
        return None
