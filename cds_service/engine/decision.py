"""Judge one order: collect its evidence, then the policy's decision table decides (the first rule that holds)."""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, field, replace
from typing import Any

from .evidence import Evidence, OrderEvidence, collect, evidence_line
from .memo import Memo
from .orders import OrderView, read_order
from .policy.model import Coding, Cond, EvidenceTest, FactTest, Group, Policy, Rule
from .prefilter import might_flag


@dataclass
class Verdict:
    """The policy's judgement of one order: which rule decided, why, and on what evidence."""

    order: OrderView
    policy: Policy
    rule: str
    flagged: bool
    reason: str
    # The evidence that made the deciding rule hold.
    deciding: list[Evidence] = field(default_factory=list)
    evidence_for: list[Evidence] = field(default_factory=list)
    evidence_against: list[Evidence] = field(default_factory=list)
    region: str | None = None
    billing_code: Coding | None = None


@dataclass(frozen=True)
class _Facts:
    status: str | None
    intent: str | None
    do_not_perform: bool
    evidence: tuple[Evidence, ...]
    by_kind: dict[str, tuple[Evidence, ...]] = field(default_factory=dict)


def _holds(cond: Cond, facts: _Facts, witnesses: list[Evidence]) -> bool:
    """Whether a condition holds; the evidence that made it hold is added to `witnesses`."""
    if isinstance(cond, EvidenceTest):
        matches = [
            e
            for e in facts.by_kind.get(cond.kind, ())
            if (cond.places is None or e.place in cond.places)
            and e.assertion in cond.assertions
            and (cond.groups is None or e.group in cond.groups)
        ]
        witnesses.extend(matches)
        return bool(matches)
    if isinstance(cond, FactTest):
        if cond.fact == "do_not_perform":
            return str(facts.do_not_perform).lower() in cond.values
        value = facts.status if cond.fact == "status" else facts.intent
        return value is not None and value in cond.values
    return _group_holds(cond, facts, witnesses)


def _group_holds(group: Group, facts: _Facts, witnesses: list[Evidence]) -> bool:
    found: list[Evidence] = []
    if not all(_holds(c, facts, found) for c in group.all):
        return False
    if group.any:
        held = [c for c in group.any if _holds(c, facts, found)]
        if not held:
            return False
    if any(_holds(c, facts, []) for c in group.unless):
        return False
    witnesses.extend(found)
    return True


def _unique(items: list[Evidence]) -> list[Evidence]:
    return list(dict.fromkeys(items))


def _fill(rule: Rule, facts: _Facts, deciding: list[Evidence]) -> str:
    """The rule's reason with {status}, {intent} and {<evidence kind>} (the first such evidence's group) filled."""
    names = {name for _, name, _, _ in string.Formatter().parse(rule.reason) if name}
    if not names:
        return rule.reason
    values: dict[str, str] = {"status": facts.status or "unknown", "intent": facts.intent or "unknown"}
    if "deciding" in names:
        values["deciding"] = evidence_line(deciding[0]) if deciding else "no evidence"
    for name in names - values.keys():
        pick = next((e for e in deciding if e.kind == name), None) or next(
            (e for e in facts.evidence if e.kind == name), None
        )
        values[name] = (pick.group or pick.text) if pick else name
    return rule.reason.format_map(values)


def region_of(policy: Policy, evidence: list[Evidence]) -> str | None:
    """The one region the order names, read place group by place group (policy `alternatives.region_from`); the
    region named like the anatomy itself ("spine") is no region; several regions are none."""
    for places in policy.region_from:
        regions = {
            e.region
            for e in evidence
            if e.kind == "anatomy"
            and e.asserted
            and e.place in places
            and e.region
            and e.region != policy.recognition.anatomy
        }
        if regions:
            return regions.pop() if len(regions) == 1 else None
    return None


def decide(order: OrderView, policy: Policy, found: OrderEvidence) -> Verdict:
    """Apply the policy's decision table to an order's evidence."""
    by_kind: dict[str, list[Evidence]] = {}
    for item in found.items:
        by_kind.setdefault(item.kind, []).append(item)
    facts = _Facts(
        order.status,
        order.intent,
        order.do_not_perform,
        tuple(found.items),
        {k: tuple(v) for k, v in by_kind.items()},
    )
    for rule in policy.rules:
        witnesses: list[Evidence] = []
        if rule.when is not None and not _holds(rule.when, facts, witnesses):
            continue
        deciding = _unique(witnesses)
        evidence_for = [e for e in found.items if e.pro and e.asserted]
        against = [e for e in found.items if not e.pro or not e.asserted]
        if rule.flags:
            evidence_for = _unique([e for e in deciding if e.pro] + evidence_for)
        else:
            against = _unique([e for e in deciding if not e.pro or not e.asserted] + against)
        billing = found.billing_codes or found.cpt_codes
        return Verdict(
            order=order,
            policy=policy,
            rule=rule.id,
            flagged=rule.flags,
            reason=_fill(rule, facts, deciding),
            deciding=deciding,
            evidence_for=evidence_for,
            evidence_against=against,
            region=region_of(policy, found.mentions) if rule.flags else None,
            billing_code=Coding(*billing[0]) if rule.flags and billing else None,
        )
    raise AssertionError("the loader guarantees a last rule without a condition")


@functools.lru_cache(maxsize=1024)
def _quiet(policy: Policy, status: str | None, intent: str | None, do_not_perform: bool) -> tuple[Rule, str]:
    """The rule that decides an order with no evidence at all, by its request facts (cached: few combinations)."""
    facts = _Facts(status, intent, do_not_perform, ())
    for rule in policy.rules:
        if rule.when is None or _holds(rule.when, facts, []):
            return rule, _fill(rule, facts, [])
    raise AssertionError("the loader guarantees a last rule without a condition")


# Verdicts by (policy, the content of the elements the engine reads): an EHR sends the same orderables call after
# call, and a verdict depends on nothing else. Bounded; only the identity of the order differs between hits.
_memo: Memo[tuple[int, bytes], Verdict] = Memo(4096)


def judge(order: OrderView, policy: Policy) -> Verdict:
    """The one way an order is judged (a hook call, `evaluate`, `check-policy` examples alike).

    The first pass decides whether any flagging rule of the policy could hold; an order that names none of the
    words or codes those rules need is decided on its request facts alone, without reading its places (its verdict
    says so: the table's rule for an order with no evidence). An order whose read elements were judged before under
    the same policy gets that judgement again (memo). Otherwise its evidence is collected and the table decides."""
    rec = policy.recognition
    if rec.prefilter and not might_flag(rec, order.words):
        rule, reason = _quiet(policy, order.status, order.intent, order.do_not_perform)
        return Verdict(order=order, policy=policy, rule=rule.id, flagged=rule.flags, reason=reason)
    key = (id(policy), order.words.content)
    known = _memo.get(key)
    if known is not None and known.policy is policy:
        order.share_places(known.order)
        return replace(known, order=order)
    verdict = decide(order, policy, collect(order, policy))
    _memo.put(key, verdict)
    return verdict


def judge_resource(resource: dict[str, Any], policy: Policy, original: dict[str, Any] | None = None) -> Verdict:
    """Judge one ServiceRequest as sent (`original`: the client's resource when `resource` is its fixed copy)."""
    return judge(read_order(resource, original), policy)
