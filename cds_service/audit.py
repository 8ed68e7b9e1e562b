"""What one service call leaves in the audit log (who called, what was judged), and the sink that stores it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol


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
