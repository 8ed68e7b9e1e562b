"""What one service call leaves in the audit log (who called, what was judged), and the sink that stores it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .engine import Outcome


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
    orders: list[dict[str, Any]] = field(default_factory=list)
    cards: list[dict[str, Any]] = field(default_factory=list)
    system_actions: list[dict[str, Any]] = field(default_factory=list)
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

    def failed(self, status: int, reason: str) -> None:
        """A refused or failed call: its status and why (a reason set earlier, such as a 401's, is kept)."""
        self.status = status
        self.error = self.error or reason


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
