"""What the engine answers, typed: cards, system actions, notes, and the verdict records the audit log keeps."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .decision import Verdict
from .evidence import Evidence
from .memo import Memo
from .policy.model import Policy

SuggestionKind = Literal["remove", "replace"]
CardKind = Literal["guideline", "instructions", "alternative"]
# Version of the verdict record the audit log stores (1: before rule ids; 2: rule ids and deciding evidence).
VERDICT_RECORD_VERSION = 2


@dataclass(frozen=True)
class SuggestionOutcome:
    uuid: str
    label: str
    kind: SuggestionKind
    actions: tuple[str, ...]


@dataclass(frozen=True)
class CardOutcome:
    """One card: what it is about (for the audit log and the report) and its CDS Hooks JSON (for the client)."""

    uuid: str
    kind: CardKind
    policy: str
    rule: str
    order: str | None
    order_name: str
    topic: str
    indicator: str
    suggestions: tuple[SuggestionOutcome, ...]
    json: dict[str, Any]

    def summary(self) -> CardRecord:
        """What the audit log keeps of a card: ids and kinds, not its text."""
        return CardRecord(
            uuid=self.uuid,
            kind=self.kind,
            indicator=self.indicator,
            topic=self.topic,
            policy=self.policy,
            rule=self.rule,
            order=self.order or None,
            order_name=self.order_name,
            suggestions=tuple(SuggestionRecord(s.uuid, s.label, s.kind, s.actions) for s in self.suggestions),
        )


@dataclass(frozen=True)
class ActionOutcome:
    """One systemAction: the CRD coverage-information update of one order."""

    type: str
    order: str | None
    assertion_id: str | None
    json: dict[str, Any]

    def summary(self) -> ActionRecord:
        return ActionRecord(type=self.type, resource=self.order)


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def _text_or_none(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class SuggestionRecord:
    """A card's suggestion as the audit log keeps it."""

    uuid: str
    label: str
    kind: str
    actions: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "label": self.label, "kind": self.kind, "actions": list(self.actions)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuggestionRecord:
        raw = data.get("actions")
        actions = tuple(a for a in raw if isinstance(a, str)) if isinstance(raw, list) else ()
        return cls(_text(data, "uuid"), _text(data, "label"), _text(data, "kind"), actions)


@dataclass(frozen=True)
class CardRecord:
    """A card as the audit log keeps it: ids and kinds, not its text (JSON: CardOutcome's stored summary)."""

    uuid: str
    kind: str
    indicator: str
    topic: str
    policy: str
    rule: str
    order: str | None
    order_name: str
    suggestions: tuple[SuggestionRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "kind": self.kind,
            "indicator": self.indicator,
            "topic": self.topic,
            "policy": self.policy,
            "rule": self.rule,
            "orders": [self.order] if self.order else [],
            "orderName": self.order_name,
            "suggestions": [s.to_json() for s in self.suggestions],
        }

    @classmethod
    def from_json(cls, data: Any) -> CardRecord | None:
        """A stored card summary; None for something that is not one."""
        if not isinstance(data, dict):
            return None
        orders = data.get("orders")
        order = orders[0] if isinstance(orders, list) and orders and isinstance(orders[0], str) else None
        raw = data.get("suggestions")
        suggestions = (
            tuple(SuggestionRecord.from_json(s) for s in raw if isinstance(s, dict)) if isinstance(raw, list) else ()
        )
        return cls(
            uuid=_text(data, "uuid"),
            kind=_text(data, "kind"),
            indicator=_text(data, "indicator"),
            topic=_text(data, "topic"),
            policy=_text(data, "policy"),
            rule=_text(data, "rule"),
            order=order,
            order_name=_text(data, "orderName"),
            suggestions=suggestions,
        )


@dataclass(frozen=True)
class ActionRecord:
    """A systemAction as the audit log keeps it: its type and the order it updates."""

    type: str
    resource: str | None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "resource": self.resource}

    @classmethod
    def from_json(cls, data: Any) -> ActionRecord | None:
        if not isinstance(data, dict):
            return None
        return cls(type=_text(data, "type"), resource=_text_or_none(data, "resource"))


@dataclass(frozen=True)
class EvidenceRecord:
    kind: str
    label: str
    place: str
    group: str
    assertion: str

    @classmethod
    def of(cls, item: Evidence) -> EvidenceRecord:
        return cls(item.kind, item.label, item.place, item.group, item.assertion)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvidenceRecord:
        return cls(
            str(data.get("kind") or ""),
            str(data.get("label") or ""),
            str(data.get("place") or ""),
            str(data.get("group") or data.get("name") or ""),
            str(data.get("assertion") or "affirmed"),
        )

    def to_json(self) -> dict[str, str]:
        out = {"kind": self.kind, "label": self.label, "place": self.place}
        if self.group:
            out["group"] = self.group
        if self.assertion != "affirmed":  # "requested" and the unasserted ones are worth keeping
            out["assertion"] = self.assertion
        return out


@dataclass(frozen=True)
class VerdictRecord:
    """A verdict as the audit log stores it and the report reads it (versioned; older records still read)."""

    order: str | None
    order_name: str
    policy: str
    policy_version: str
    flagged: bool
    rule: str
    reason: str
    deciding: tuple[EvidenceRecord, ...] = ()
    evidence_for: tuple[EvidenceRecord, ...] = ()
    evidence_against: tuple[EvidenceRecord, ...] = ()
    region: str | None = None
    version: int = VERDICT_RECORD_VERSION
    # The deciding rule is marked `review: true`: a not-flagged order the report lists as a possible miss.
    review: bool = False

    @classmethod
    def of(cls, verdict: Verdict) -> VerdictRecord:
        """The verdict's record. Everything but the order's reference follows from the policy and the order's read
        content (decision.judge's memo key), so the rest is remembered for the next order of the same content."""
        key = (verdict.policy, verdict.order.words.content, verdict.rule)
        known = _records.get(key)
        if known is None:
            known = cls._of(verdict)
            _records.put(key, known)
        reference = verdict.order.reference
        return known if known.order == reference else replace(known, order=reference)

    @classmethod
    def _of(cls, verdict: Verdict) -> VerdictRecord:
        return cls(
            order=verdict.order.reference,
            order_name=" ".join(verdict.order.label().split())[:200],
            policy=verdict.policy.id,
            policy_version=verdict.policy.version,
            flagged=verdict.flagged,
            rule=verdict.rule,
            reason=verdict.reason,
            deciding=tuple(map(EvidenceRecord.of, verdict.deciding)),
            evidence_for=tuple(map(EvidenceRecord.of, verdict.evidence_for)),
            evidence_against=tuple(map(EvidenceRecord.of, verdict.evidence_against)),
            region=verdict.region,
            review=verdict.rule in verdict.policy.review_rules,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": self.version,
            "order": self.order,
            "orderName": self.order_name,
            "policy": self.policy,
            "policyVersion": self.policy_version,
            "verdict": "flagged" if self.flagged else "not-flagged",
            "rule": self.rule,
            "reason": self.reason,
            "deciding": [e.to_json() for e in self.deciding],
            "evidenceFor": [e.to_json() for e in self.evidence_for],
            "evidenceAgainst": [e.to_json() for e in self.evidence_against],
        }
        if self.region:
            out["region"] = self.region
        if self.review:
            out["review"] = True
        return out

    @classmethod
    def from_json(cls, data: Any) -> VerdictRecord | None:
        """A stored record of any version; None for something that is not one."""
        if not isinstance(data, dict):
            return None

        def items(key: str) -> tuple[EvidenceRecord, ...]:
            raw = data.get(key)
            return (
                tuple(EvidenceRecord.from_json(e) for e in raw if isinstance(e, dict)) if isinstance(raw, list) else ()
            )

        raw_version = data.get("v")
        version = raw_version if isinstance(raw_version, int) else 1
        return cls(
            order=data.get("order") if isinstance(data.get("order"), str) else None,
            order_name=str(data.get("orderName") or ""),
            policy=str(data.get("policy") or ""),
            policy_version=str(data.get("policyVersion") or ""),
            flagged=data.get("verdict") == "flagged",
            # Version 1 records were written before the decision table named its rules.
            rule=str(data.get("rule") or "(before rule ids)"),
            reason=str(data.get("reason") or ""),
            deciding=items("deciding"),
            evidence_for=items("evidenceFor"),
            evidence_against=items("evidenceAgainst"),
            region=data.get("region") if isinstance(data.get("region"), str) else None,
            version=version,
            review=data.get("review") is True,
        )


# Verdict records by (policy, order content, rule); bounded like decision.judge's memo.
_records: Memo[tuple[Policy, bytes, str], VerdictRecord] = Memo(4096)


@dataclass
class Outcome:
    """Everything one hook call decided."""

    verdicts: list[Verdict]
    cards: list[CardOutcome] = field(default_factory=list)
    system_actions: list[ActionOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def response(self) -> dict[str, Any]:
        """The CDS Hooks response body."""
        return {"cards": [c.json for c in self.cards], "systemActions": [a.json for a in self.system_actions]}

    @property
    def coverage_assertions(self) -> list[str]:
        return [a.assertion_id for a in self.system_actions if a.assertion_id]

    def verdict_records(self) -> list[VerdictRecord]:
        return [VerdictRecord.of(v) for v in self.verdicts]
