"""Possible misses: orders not flagged by a rule marked for review, grouped for the report and written as examples."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ...engine.outcome import VerdictRecord
from .model import MissCode, MissedOrder, PossibleMisses, Report, RuleCount, day

# Billing codes kept in a verdict record's evidence label: "CPT 76496 Unlisted fluoroscopic procedure".
_CODE_LABEL = re.compile(r"^(?P<system>\S+) (?P<code>\S+)(?: (?P<display>.+))?$")


@dataclass
class _Miss:
    # The rule, not its filled reason: a reason may quote an order's notes, and the queue shows order text only.
    policy: str
    rule: str
    order_name: str
    codes: tuple[tuple[str, str, str], ...]
    count: int
    first_seen: datetime
    last_seen: datetime
    versions: set[str] = field(default_factory=set)


class MissCounter:
    """Not-flagged orders decided by a rule marked for review, grouped by policy, order name and billing codes."""

    def __init__(self) -> None:
        self.orders: dict[tuple[str, str, tuple[tuple[str, str, str], ...]], _Miss] = {}
        self.by_rule: Counter[tuple[str, str, str]] = Counter()

    def add(self, record: VerdictRecord, at: datetime) -> None:
        self.by_rule[(record.policy, record.policy_version, record.rule)] += 1
        # What the audit keeps of the order: its name and the evidence labels; the billing codes in the order's
        # code are read back from those labels (system name, code, display). Nothing else of the order is kept.
        codes: list[tuple[str, str, str]] = []
        for item in (*record.evidence_for, *record.evidence_against, *record.deciding):
            found = _CODE_LABEL.match(item.label) if item.kind == "billing-code" and item.place == "code" else None
            if found and (found["system"], found["code"], found["display"] or "") not in codes:
                codes.append((found["system"], found["code"], found["display"] or ""))
        key = (record.policy, " ".join(record.order_name.split()), tuple(sorted(codes)))
        miss = self.orders.get(key)
        if miss is None:
            miss = self.orders[key] = _Miss(record.policy, record.rule, key[1], key[2], 0, at, at)
        miss.count += 1
        miss.first_seen, miss.last_seen = min(miss.first_seen, at), max(miss.last_seen, at)
        miss.versions.add(record.policy_version)
        if at >= miss.last_seen:  # the latest judgement names the rule
            miss.rule = record.rule

    def summary(self) -> PossibleMisses:
        ordered = sorted(self.orders.values(), key=lambda m: (-m.count, m.policy, m.rule, m.order_name, m.codes))
        return PossibleMisses(
            by_rule=tuple(
                RuleCount(policy, version, rule, count)
                for (policy, version, rule), count in sorted(self.by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
            ),
            orders=tuple(
                MissedOrder(
                    policy=m.policy,
                    rule=m.rule,
                    order_name=m.order_name,
                    codes=tuple(MissCode(system, code, display) for system, code, display in m.codes),
                    count=m.count,
                    versions=tuple(sorted(m.versions)),
                    first_seen=m.first_seen,
                    last_seen=m.last_seen,
                )
                for m in ordered
            ),
        )


def possible_miss_examples(
    report: Report, systems: Mapping[str, Mapping[str, str]] | None = None
) -> list[dict[str, Any]]:
    """The report's possible misses as labelled examples (policies/examples/*.json) with an empty label, for an analyst
    to label and add to the policy's examples. The resource holds what the audit keeps: the order's name as its code
    text and the billing codes of its code (`systems`: per policy, the code system URI of each system name shown
    in evidence, e.g. {"CPT": "http://www.ama-assn.org/go/cpt"}); no patient, practitioner or encounter reference."""
    systems = systems or {}
    return [_example(miss, systems.get(miss.policy, {})) for miss in report.possible_misses.orders]


def _example(miss: MissedOrder, systems: Mapping[str, str]) -> dict[str, Any]:
    codes = [(c.system, c.code, c.display) for c in miss.codes]
    digest = hashlib.sha256(repr((miss.policy, miss.order_name, codes)).encode()).hexdigest()[:12]
    eid = f"possible-miss-{digest}"
    code: dict[str, Any] = {}
    if miss.order_name:
        code["text"] = miss.order_name
    codings = []
    for system, value, display in codes:
        coding = {"code": value}
        uri = systems.get(system)
        if uri:
            coding = {"system": uri, "code": value}
        if display:
            coding["display"] = display
        codings.append(coding)
    if codings:
        code["coding"] = codings
    resource: dict[str, Any] = {"resourceType": "ServiceRequest", "id": eid, "status": "draft", "intent": "order"}
    if code:
        resource["code"] = code
    first, last = day(miss.first_seen), day(miss.last_seen)
    seen = first if first == last else f"{first} to {last}"
    return {
        "id": eid,
        "label": "",
        "why": f"possible miss: rule {miss.rule}; {miss.count} time(s), {seen}",
        "policy": miss.policy,
        "resource": resource,
    }
