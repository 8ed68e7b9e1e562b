"""What one service call leaves in the audit log (who called, what was judged), and the sink that stores it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from .engine.outcome import ActionRecord, CardRecord, VerdictRecord

if TYPE_CHECKING:
    from .engine import Outcome

# The typed parts are turned into JSON only where a record is written (database, journal, spill file).
JSON_PARTS = ("orders", "cards", "system_actions")


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

    def answered(self, outcome: Outcome) -> None:
        """What the clinician was told: each judged order's verdict and rule, the cards, the CRD actions."""
        self.orders = outcome.verdict_records()
        self.cards = [card.summary() for card in outcome.cards]
        self.system_actions = [action.summary() for action in outcome.system_actions]
        self.coverage_assertions = outcome.coverage_assertions
        self.notes = outcome.notes

    def json_parts(self) -> dict[str, list[dict[str, Any]]]:
        """The typed parts as the database columns, journal and spill lines store them."""
        return {
            "orders": [o.to_json() for o in self.orders],
            "cards": [c.to_json() for c in self.cards],
            "system_actions": [a.to_json() for a in self.system_actions],
        }

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
