"""The committee report as typed parts, and its one serialisation to the JSON shape `report --format json` prints."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any


def iso(moment: datetime) -> str:
    """A moment as the report writes it: UTC, to the second, with a Z."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def day(moment: datetime | None) -> str:
    """The UTC date of a moment (empty when there is none), as the renderers show it."""
    return "" if moment is None else moment.astimezone(UTC).date().isoformat()


def _iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


@dataclass(frozen=True)
class Period:
    since: datetime | None
    until: datetime


@dataclass(frozen=True)
class HookCalls:
    hook: str
    service: str
    calls: int
    answered: int
    errors: int


@dataclass(frozen=True)
class Calls:
    by_hook: tuple[HookCalls, ...]

    @property
    def total(self) -> int:
        return sum(h.calls for h in self.by_hook)

    @property
    def answered(self) -> int:
        return sum(h.answered for h in self.by_hook)

    @property
    def errors(self) -> int:
        return sum(h.errors for h in self.by_hook)


@dataclass(frozen=True)
class PolicyOrders:
    policy: str
    version: str
    judged: int
    flagged: int


@dataclass(frozen=True)
class RuleCount:
    """Orders counted by the rule that decided them (flagged orders, or possible misses)."""

    policy: str
    version: str
    rule: str
    count: int


@dataclass(frozen=True)
class Tally:
    """A named count in a list ordered most frequent first (evidence kinds, kinds of suggestion taken)."""

    name: str
    count: int


@dataclass(frozen=True)
class Orders:
    judged: int
    flagged: int
    by_policy: tuple[PolicyOrders, ...]
    by_evidence_kind: tuple[Tally, ...]
    by_rule: tuple[RuleCount, ...]


@dataclass(frozen=True)
class Cards:
    shown: int
    with_outcome: int
    shown_in_period_with_outcome: int


@dataclass(frozen=True)
class AcceptedSuggestion:
    kind: str
    label: str
    count: int


@dataclass(frozen=True)
class OverrideComment:
    card: str
    at: datetime
    comment: str


@dataclass(frozen=True)
class OverrideReason:
    code: str
    display: str
    system: str
    count: int
    comments: tuple[OverrideComment, ...]


@dataclass(frozen=True)
class Feedback:
    items: int
    items_for_unknown_cards: int
    accepted: int
    accepted_by_suggestion: tuple[AcceptedSuggestion, ...]
    accepted_by_kind: tuple[Tally, ...]
    overridden: int
    overrides_by_reason: tuple[OverrideReason, ...]

    @property
    def override_rate(self) -> float | None:
        return rate(self.overridden, self.accepted + self.overridden)


@dataclass(frozen=True)
class Latency:
    """Milliseconds of answered calls, nearest-rank percentiles rounded to the microsecond (None when no call)."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class ErrorReason:
    reason: str
    count: int


@dataclass(frozen=True)
class StatusErrors:
    status: int
    reasons: tuple[ErrorReason, ...]

    @property
    def count(self) -> int:
        return sum(r.count for r in self.reasons)


@dataclass(frozen=True)
class Errors:
    by_status: tuple[StatusErrors, ...]

    @property
    def total(self) -> int:
        return sum(s.count for s in self.by_status)


@dataclass(frozen=True)
class Week:
    week: date
    calls: int
    flagged: int
    cards: int
    accepted: int
    overridden: int


@dataclass(frozen=True)
class PolicyVersion:
    policy: str
    version: str
    first_seen: datetime | None
    last_seen: datetime | None
    judged: int
    flagged: int
    cards: int
    accepted: int
    overridden: int

    @property
    def override_rate(self) -> float | None:
        return rate(self.overridden, self.accepted + self.overridden)


@dataclass(frozen=True)
class PolicyVersions:
    changed: bool
    versions: tuple[PolicyVersion, ...]


@dataclass(frozen=True)
class FalseAlarm:
    card: str
    order_name: str
    rule: str
    policy: str
    version: str
    shown_at: datetime | None
    overridden_at: datetime
    reason: str
    comment: str


@dataclass(frozen=True)
class MissCode:
    system: str
    code: str
    display: str


@dataclass(frozen=True)
class MissedOrder:
    policy: str
    rule: str
    order_name: str
    codes: tuple[MissCode, ...]
    count: int
    versions: tuple[str, ...]
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class PossibleMisses:
    by_rule: tuple[RuleCount, ...]
    orders: tuple[MissedOrder, ...]

    @property
    def total(self) -> int:
        return sum(r.count for r in self.by_rule)


@dataclass(frozen=True)
class Report:
    """Every number of the report; `to_json` is the public JSON shape (`cds-service report --format json`)."""

    period: Period
    calls: Calls
    orders: Orders
    cards: Cards
    feedback: Feedback
    latency_ms: Latency
    errors: Errors
    weeks: tuple[Week, ...]
    policy_versions: PolicyVersions
    false_alarms: tuple[FalseAlarm, ...]
    possible_misses: PossibleMisses
    definitions: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The report as the JSON object `report --format json` prints (key names and order are public)."""
        return {
            "period": {"since": _iso_or_none(self.period.since), "until": iso(self.period.until)},
            "calls": _calls(self.calls),
            "orders": _orders(self.orders),
            "cards": {
                "shown": self.cards.shown,
                "withOutcome": self.cards.with_outcome,
                "shownInPeriodWithOutcome": self.cards.shown_in_period_with_outcome,
            },
            "feedback": _feedback(self.feedback),
            "latencyMs": {name: getattr(self.latency_ms, name) for name in ("count", "p50", "p95", "p99", "max")},
            "errors": _errors(self.errors),
            "byWeek": [_week(w) for w in self.weeks],
            "policyVersions": {
                "changed": self.policy_versions.changed,
                "versions": [_version(v) for v in self.policy_versions.versions],
            },
            "falseAlarms": [_false_alarm(a) for a in self.false_alarms],
            "possibleMisses": _misses(self.possible_misses),
            "definitions": list(self.definitions),
        }


# The JSON of each part, used only by Report.to_json: the one place the report's key names are written.


def _calls(calls: Calls) -> dict[str, Any]:
    return {
        "total": calls.total,
        "answered": calls.answered,
        "errors": calls.errors,
        "byHook": [
            {"hook": h.hook, "service": h.service, "calls": h.calls, "answered": h.answered, "errors": h.errors}
            for h in calls.by_hook
        ],
    }


def _orders(orders: Orders) -> dict[str, Any]:
    return {
        "judged": orders.judged,
        "flagged": orders.flagged,
        "byPolicy": [
            {"policy": p.policy, "version": p.version, "judged": p.judged, "flagged": p.flagged}
            for p in orders.by_policy
        ],
        "flaggedByEvidenceKind": {t.name: t.count for t in orders.by_evidence_kind},
        "flaggedByRule": [
            {"policy": r.policy, "version": r.version, "rule": r.rule, "flagged": r.count} for r in orders.by_rule
        ],
    }


def _feedback(fb: Feedback) -> dict[str, Any]:
    return {
        "items": fb.items,
        "itemsForUnknownCards": fb.items_for_unknown_cards,
        "accepted": fb.accepted,
        "acceptedBySuggestion": [
            {"kind": s.kind, "label": s.label, "count": s.count} for s in fb.accepted_by_suggestion
        ],
        "acceptedByKind": {t.name: t.count for t in fb.accepted_by_kind},
        "overridden": fb.overridden,
        "overrideRate": fb.override_rate,
        "overridesByReason": [
            {
                "code": r.code,
                "display": r.display,
                "system": r.system,
                "count": r.count,
                "comments": [{"card": c.card, "at": iso(c.at), "comment": c.comment} for c in r.comments],
            }
            for r in fb.overrides_by_reason
        ],
    }


def _errors(errors: Errors) -> dict[str, Any]:
    return {
        "total": errors.total,
        "byStatus": [
            {
                "status": s.status,
                "count": s.count,
                "reasons": [{"reason": r.reason, "count": r.count} for r in s.reasons],
            }
            for s in errors.by_status
        ],
    }


def _week(w: Week) -> dict[str, Any]:
    return {
        "week": w.week.isoformat(),
        "calls": w.calls,
        "flagged": w.flagged,
        "cards": w.cards,
        "accepted": w.accepted,
        "overridden": w.overridden,
    }


def _version(v: PolicyVersion) -> dict[str, Any]:
    return {
        "policy": v.policy,
        "version": v.version,
        "firstSeen": _iso_or_none(v.first_seen),
        "lastSeen": _iso_or_none(v.last_seen),
        "judged": v.judged,
        "flagged": v.flagged,
        "cards": v.cards,
        "accepted": v.accepted,
        "overridden": v.overridden,
        "overrideRate": v.override_rate,
    }


def _false_alarm(a: FalseAlarm) -> dict[str, Any]:
    return {
        "card": a.card,
        "orderName": a.order_name,
        "rule": a.rule,
        "policy": a.policy,
        "version": a.version,
        "shownAt": _iso_or_none(a.shown_at),
        "overriddenAt": iso(a.overridden_at),
        "reason": a.reason,
        "comment": a.comment,
    }


def _misses(misses: PossibleMisses) -> dict[str, Any]:
    return {
        "total": misses.total,
        "byRule": [
            {"policy": r.policy, "version": r.version, "rule": r.rule, "orders": r.count} for r in misses.by_rule
        ],
        "orders": [
            {
                "policy": m.policy,
                "rule": m.rule,
                "orderName": m.order_name,
                "codes": [{"system": c.system, "code": c.code, "display": c.display} for c in m.codes],
                "count": m.count,
                "versions": list(m.versions),
                "firstSeen": iso(m.first_seen),
                "lastSeen": iso(m.last_seen),
            }
            for m in misses.orders
        ],
    }
