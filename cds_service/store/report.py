"""The monthly report for the CDS committee: calls, orders flagged, cards, what clinicians did with them, and why."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import func, select

from ..engine.outcome import VerdictRecord
from .db import Database
from .models import audit_call, audit_card, feedback

# Human names for the engine's evidence kinds (version 1 records used the older names).
EVIDENCE_KINDS = {
    "billing-code": "billing code",
    "technique": "technique named",
    "ambiguous-technique": "technique with anatomy",
    "anatomy": "anatomy named",
    "billing_code": "billing code",
    "spine": "anatomy named",
}
REMOVED = "removed the order"
SWITCHED = "switched to the suggested alternative order"
DEFINITIONS = [
    "Calls, orders and cards: calls that started in the period. An order judged at order-select and again at "
    "order-sign counts once per call.",
    "Feedback: items whose outcomeTimestamp is in the period. A card's outcome is its latest item "
    "(by outcomeTimestamp). Items for card uuids not in the audit log are counted apart, not in the rates.",
    "Override rate: overridden cards / cards with an outcome.",
    "Latency: answered calls (HTTP 200), nearest-rank percentiles of the time the service spent on the call.",
    "Weeks start on Monday (UTC). Calls, flagged orders and cards count in the week the call started; accepted "
    "and overridden cards in the week of their latest outcome.",
    "Policy versions: the version that judged each order, as the audit log recorded it; a card counts for the "
    "version that judged its order.",
    "Possible false alarms: cards whose latest outcome is an override with a reason that says the order was not "
    "what the policy is about (by default the code not-dsv).",
    "Possible misses: orders not flagged by a decision rule the policy marks `review: true` (as the audit log "
    "recorded it, or as the policy marks it now for records written before the mark was kept). Counted per call "
    "like judged orders; listed by order name (the order's own text), never with patient, practitioner or encounter "
    "identifiers.",
]
# Override reason codes that say "this card should not have fired" (the policy's not-dsv reason).
FALSE_ALARM_CODES: tuple[str, ...] = ("not-dsv",)
_MAX_WEEKS = 520


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it (exact, no blend)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _suggestion_kind(actions: list[Any]) -> str:
    if "create" in actions:
        return SWITCHED
    if actions and all(a == "delete" for a in actions):
        return REMOVED
    return "other suggestion"


def _week(moment: datetime) -> date:
    day = moment.astimezone(UTC).date()
    return day - timedelta(days=day.weekday())


def _card_facts(started_at: datetime, orders: list[Any] | None, cards: list[Any] | None) -> dict[str, dict[str, Any]]:
    """For each card of one call: the policy version that judged its order, the order's name, the rule, the date."""
    verdicts: dict[tuple[str, str], VerdictRecord] = {}
    for stored in orders or []:
        record = VerdictRecord.from_json(stored)
        if record is not None and record.order:
            verdicts[(record.policy, record.order)] = record
    facts: dict[str, dict[str, Any]] = {}
    for card in cards or []:
        if not isinstance(card, dict) or not card.get("uuid"):
            continue
        refs = card.get("orders") or []
        verdict = verdicts.get((str(card.get("policy") or ""), refs[0])) if refs else None
        if verdict is None and refs:  # cards written before they named their policy
            verdict = next((v for (_, order), v in verdicts.items() if order == refs[0]), None)
        facts[card["uuid"]] = {
            "policy": verdict.policy if verdict else str(card.get("policy") or ""),
            "version": verdict.policy_version if verdict else "",
            "orderName": str(card.get("orderName") or (verdict.order_name if verdict else "")),
            "rule": str(card.get("rule") or (verdict.rule if verdict else "")),
            "shownAt": _iso(started_at),
        }
    return facts


def build_report(
    db: Database,
    since: datetime | None = None,
    until: datetime | None = None,
    reason_displays: Mapping[tuple[str, str], str] | None = None,
    false_alarm_codes: tuple[str, ...] = FALSE_ALARM_CODES,
    review_rules: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, Any]:
    """Every number of the report, computed from the audit log and feedback tables.

    `reason_displays` names override reasons by (system, code), from the policies: a client may send the code alone
    (the CDS Hooks sandbox sends {code, system}), and the committee reads the words the card offered.
    """
    reason_displays = reason_displays or {}
    review_rules = review_rules or {}
    misses = PossibleMisses()
    until = until or datetime.now(UTC)
    weeks: dict[date, Counter[str]] = defaultdict(Counter)
    by_version: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    version_seen: dict[tuple[str, str], list[datetime]] = {}
    card_facts: dict[str, dict[str, Any]] = {}
    calls_by_hook: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    judged_by_policy: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    evidence_kinds: Counter[str] = Counter()
    by_rule: Counter[tuple[str, str, str]] = Counter()
    errors: dict[int, Counter[str]] = defaultdict(Counter)
    durations: list[float] = []
    shown: set[str] = set()
    judged = flagged = 0

    call_filter = [audit_call.c.started_at < until]
    if since:
        call_filter.append(audit_call.c.started_at >= since)
    fb_filter = [feedback.c.outcome_timestamp < until]
    if since:
        fb_filter.append(feedback.c.outcome_timestamp >= since)

    with db.engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(
            select(
                audit_call.c.service_id,
                audit_call.c.hook,
                audit_call.c.status,
                audit_call.c.error,
                audit_call.c.duration_ms,
                audit_call.c.orders,
                audit_call.c.cards,
                audit_call.c.started_at,
            ).where(*call_filter)
        )
        for service_id, hook, status, error, duration_ms, orders, cards, started_at in rows:
            counter = calls_by_hook[(hook or "", service_id)]
            counter["calls"] += 1
            week = weeks[_week(started_at)]
            week["calls"] += 1
            if status != 200:
                counter["errors"] += 1
                errors[status][error or "(no reason recorded)"] += 1
                continue
            counter["answered"] += 1
            durations.append(float(duration_ms))
            for stored in orders or []:
                record = VerdictRecord.from_json(stored)
                if record is None:
                    continue
                judged += 1
                key = (record.policy, record.policy_version)
                judged_by_policy[key]["judged"] += 1
                seen = version_seen.setdefault(key, [started_at, started_at])
                seen[0], seen[1] = min(seen[0], started_at), max(seen[1], started_at)
                if not record.flagged and (record.review or record.rule in review_rules.get(record.policy, ())):
                    misses.add(record, started_at)
                if record.flagged:
                    flagged += 1
                    week["flagged"] += 1
                    judged_by_policy[key]["flagged"] += 1
                    by_rule[(record.policy, record.policy_version, record.rule)] += 1
                    kinds = {e.kind for e in record.deciding or record.evidence_for}
                    for kind in sorted(EVIDENCE_KINDS.get(k, k) for k in kinds):
                        evidence_kinds[kind] += 1
            for card in cards or []:
                if card.get("uuid"):
                    shown.add(card["uuid"])
                    week["cards"] += 1
            for uuid, facts in _card_facts(started_at, orders, cards).items():
                card_facts[uuid] = facts
                by_version[(facts["policy"], facts["version"])]["cards"] += 1

        # A card answered by one worker may still have been in that worker's audit queue when its feedback reached
        # another: such items were stored unlinked, and are linked here once the card is in the log.
        linked_call = func.coalesce(feedback.c.call_id, audit_card.c.call_id).label("call_id")
        items = conn.execute(
            select(
                feedback.c.id,
                feedback.c.card_uuid,
                linked_call,
                feedback.c.outcome,
                feedback.c.accepted_suggestions,
                feedback.c.override_system,
                feedback.c.override_code,
                feedback.c.override_display,
                feedback.c.user_comment,
                feedback.c.outcome_timestamp,
            )
            .select_from(
                feedback.outerjoin(
                    audit_card,
                    (audit_card.c.card_uuid == feedback.c.card_uuid)
                    & (audit_card.c.service_id == feedback.c.service_id),
                )
            )
            .where(*fb_filter)
            .order_by(feedback.c.outcome_timestamp, feedback.c.id)
        ).all()
        call_ids = sorted({item.call_id for item in items if item.call_id})
        suggestion_of: dict[str, dict[str, Any]] = {}
        for start in range(0, len(call_ids), 500):
            chunk = call_ids[start : start + 500]
            linked = select(audit_call.c.cards, audit_call.c.orders, audit_call.c.started_at).where(
                audit_call.c.call_id.in_(chunk)
            )
            for cards, orders, started_at in conn.execute(linked):
                for uuid, facts in _card_facts(started_at, orders, cards).items():
                    card_facts.setdefault(uuid, facts)
                for card in cards or []:
                    for suggestion in card.get("suggestions") or []:
                        if suggestion.get("uuid"):
                            suggestion_of[suggestion["uuid"]] = suggestion

    latest: dict[str, Any] = {}
    unknown_items = 0
    for item in items:  # ordered by time: the last one wins
        if item.call_id is None:
            unknown_items += 1
        else:
            latest[item.card_uuid] = item

    accepted: Counter[tuple[str, str]] = Counter()
    reasons: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    accepted_cards = overridden_cards = 0
    false_alarms: list[dict[str, Any]] = []
    for card_uuid, item in sorted(latest.items(), key=lambda kv: (kv[1].outcome_timestamp, kv[1].id)):
        facts = card_facts.get(card_uuid, {})
        version_key = (facts.get("policy", ""), facts.get("version", ""))
        outcome_week = weeks[_week(item.outcome_timestamp)]
        if item.outcome == "accepted":
            outcome_week["accepted"] += 1
            by_version[version_key]["accepted"] += 1
            accepted_cards += 1
            for suggestion_id in item.accepted_suggestions or []:
                suggestion = suggestion_of.get(suggestion_id)
                if suggestion is None:
                    accepted[("unknown suggestion", suggestion_id)] += 1
                else:
                    accepted[(_suggestion_kind(suggestion.get("actions") or []), suggestion.get("label") or "")] += 1
        else:
            outcome_week["overridden"] += 1
            by_version[version_key]["overridden"] += 1
            overridden_cards += 1
            display = item.override_display or reason_displays.get(
                (item.override_system or "", item.override_code or ""), ""
            )
            if item.override_code in false_alarm_codes:
                false_alarms.append(
                    {
                        "card": card_uuid,
                        "orderName": facts.get("orderName", ""),
                        "rule": facts.get("rule", ""),
                        "policy": facts.get("policy", ""),
                        "version": facts.get("version", ""),
                        "shownAt": facts.get("shownAt"),
                        "overriddenAt": _iso(item.outcome_timestamp),
                        "reason": item.override_code,
                        "comment": item.user_comment or "",
                    }
                )
            reason_key = (item.override_code or "", display, item.override_system or "")
            reasons[reason_key].append(
                {
                    "card": card_uuid,
                    "at": _iso(item.outcome_timestamp),
                    "comment": item.user_comment or "",
                }
            )

    with_outcome = accepted_cards + overridden_cards
    durations.sort()

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    kinds_accepted = Counter[str]()
    for (kind, _label), count in accepted.items():
        kinds_accepted[kind] += count
    return {
        "period": {
            "since": _iso(since) if since else None,
            "until": _iso(until),
        },
        "calls": {
            "total": sum(c["calls"] for c in calls_by_hook.values()),
            "answered": sum(c["answered"] for c in calls_by_hook.values()),
            "errors": sum(c["errors"] for c in calls_by_hook.values()),
            "byHook": [
                {
                    "hook": hook,
                    "service": service,
                    "calls": c["calls"],
                    "answered": c["answered"],
                    "errors": c["errors"],
                }
                for (hook, service), c in sorted(calls_by_hook.items())
            ],
        },
        "orders": {
            "judged": judged,
            "flagged": flagged,
            "byPolicy": [
                {"policy": policy, "version": version, "judged": c["judged"], "flagged": c["flagged"]}
                for (policy, version), c in sorted(judged_by_policy.items())
            ],
            "flaggedByEvidenceKind": dict(sorted(evidence_kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
            "flaggedByRule": [
                {"policy": policy, "version": version, "rule": rule, "flagged": count}
                for (policy, version, rule), count in sorted(by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
        },
        "cards": {
            "shown": len(shown),
            "withOutcome": with_outcome,
            "shownInPeriodWithOutcome": len(shown & latest.keys()),
        },
        "feedback": {
            "items": len(items),
            "itemsForUnknownCards": unknown_items,
            "accepted": accepted_cards,
            "acceptedBySuggestion": [
                {"kind": kind, "label": label, "count": count}
                for (kind, label), count in sorted(accepted.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "acceptedByKind": dict(sorted(kinds_accepted.items(), key=lambda kv: (-kv[1], kv[0]))),
            "overridden": overridden_cards,
            "overrideRate": round(overridden_cards / with_outcome, 4) if with_outcome else None,
            "overridesByReason": [
                {
                    "code": code,
                    "display": display,
                    "system": system,
                    "count": len(entries),
                    "comments": [e for e in entries if e["comment"]],
                }
                for (code, display, system), entries in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            ],
        },
        "latencyMs": {
            "count": len(durations),
            "p50": ms(percentile(durations, 0.50)),
            "p95": ms(percentile(durations, 0.95)),
            "p99": ms(percentile(durations, 0.99)),
            "max": ms(durations[-1] if durations else None),
        },
        "errors": {
            "total": sum(sum(c.values()) for c in errors.values()),
            "byStatus": [
                {
                    "status": status,
                    "count": sum(c.values()),
                    "reasons": [
                        {"reason": r, "count": n} for r, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
                    ],
                }
                for status, c in sorted(errors.items())
            ],
        },
        "byWeek": _weekly(weeks, since, until),
        "policyVersions": _versions(judged_by_policy, by_version, version_seen),
        "falseAlarms": false_alarms,
        "possibleMisses": misses.summary(),
        "definitions": DEFINITIONS,
    }


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


class PossibleMisses:
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

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.orders.values(), key=lambda m: (-m.count, m.policy, m.rule, m.order_name, m.codes))
        return {
            "total": sum(self.by_rule.values()),
            "byRule": [
                {"policy": policy, "version": version, "rule": rule, "orders": count}
                for (policy, version, rule), count in sorted(self.by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "orders": [
                {
                    "policy": m.policy,
                    "rule": m.rule,
                    "orderName": m.order_name,
                    "codes": [
                        {"system": system, "code": code, "display": display} for system, code, display in m.codes
                    ],
                    "count": m.count,
                    "versions": sorted(m.versions),
                    "firstSeen": _iso(m.first_seen),
                    "lastSeen": _iso(m.last_seen),
                }
                for m in ordered
            ],
        }


def possible_miss_examples(
    report: dict[str, Any], systems: Mapping[str, Mapping[str, str]] | None = None
) -> list[dict[str, Any]]:
    """The report's possible misses as labelled examples (cards/examples/*.json) with an empty label, for an analyst
    to label and add to the policy's examples. The resource holds what the audit keeps: the order's name as its code
    text and the billing codes of its code (`systems`: per policy, the code system URI of each system name shown
    in evidence, e.g. {"CPT": "http://www.ama-assn.org/go/cpt"}); no patient, practitioner or encounter reference."""
    systems = systems or {}
    out: list[dict[str, Any]] = []
    for miss in report["possibleMisses"]["orders"]:
        codes = [(c["system"], c["code"], c["display"]) for c in miss["codes"]]
        digest = hashlib.sha256(repr((miss["policy"], miss["orderName"], codes)).encode()).hexdigest()[:12]
        eid = f"possible-miss-{digest}"
        code: dict[str, Any] = {}
        if miss["orderName"]:
            code["text"] = miss["orderName"]
        codings = []
        for system, value, display in codes:
            coding = {"code": value}
            uri = systems.get(miss["policy"], {}).get(system)
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
        seen = (
            miss["firstSeen"][:10]
            if miss["firstSeen"][:10] == miss["lastSeen"][:10]
            else (f"{miss['firstSeen'][:10]} to {miss['lastSeen'][:10]}")
        )
        out.append(
            {
                "id": eid,
                "label": "",
                "why": f"possible miss: rule {miss['rule']}; {miss['count']} time(s), {seen}",
                "policy": miss["policy"],
                "resource": resource,
            }
        )
    return out


def _weekly(weeks: dict[date, Counter[str]], since: datetime | None, until: datetime) -> list[dict[str, Any]]:
    """Every week of the period in order (zeros included, so a chart's weeks are evenly spaced)."""
    if not weeks:
        return []
    first = _week(since) if since else min(weeks)
    last = max(max(weeks), _week(until - timedelta(microseconds=1)))
    first = max(first, last - timedelta(weeks=_MAX_WEEKS - 1))
    out = []
    day = first
    while day <= last:
        c = weeks.get(day, Counter())
        out.append(
            {
                "week": day.isoformat(),
                "calls": c["calls"],
                "flagged": c["flagged"],
                "cards": c["cards"],
                "accepted": c["accepted"],
                "overridden": c["overridden"],
            }
        )
        day += timedelta(weeks=1)
    return out


def _versions(
    judged: dict[tuple[str, str], Counter[str]],
    outcomes: dict[tuple[str, str], Counter[str]],
    seen: dict[tuple[str, str], list[datetime]],
) -> dict[str, Any]:
    """Numbers per policy version; `changed` when a policy answered with more than one version in the period."""
    rows = []
    for key in sorted(set(judged) | {k for k in outcomes if k != ("", "")}):
        j, o = judged.get(key, Counter()), outcomes.get(key, Counter())
        with_outcome = o["accepted"] + o["overridden"]
        first_last = seen.get(key)
        rows.append(
            {
                "policy": key[0],
                "version": key[1],
                "firstSeen": _iso(first_last[0]) if first_last else None,
                "lastSeen": _iso(first_last[1]) if first_last else None,
                "judged": j["judged"],
                "flagged": j["flagged"],
                "cards": o["cards"],
                "accepted": o["accepted"],
                "overridden": o["overridden"],
                "overrideRate": round(o["overridden"] / with_outcome, 4) if with_outcome else None,
            }
        )
    policies = Counter(policy for policy, _version in judged)
    return {"changed": any(n > 1 for n in policies.values()), "versions": rows}


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render_text(report: dict[str, Any]) -> str:
    """The report as a committee reads it: headline numbers first, then the detail, aligned."""
    period = report["period"]
    calls, orders, cards, fb = report["calls"], report["orders"], report["cards"], report["feedback"]
    latency, errors = report["latencyMs"], report["errors"]
    lines: list[str] = []
    add = lines.append
    since = period["since"] or "the first record"
    add(f"CDS service report: {since} to {period['until']} (UTC)")
    add("=" * len(lines[0]))
    add("")
    rate = "n/a" if fb["overrideRate"] is None else f"{100 * fb['overrideRate']:.1f}%"
    add("Summary")
    add(f"  Calls                 {calls['total']:>8}   ({calls['errors']} errors)")
    add(f"  Orders judged         {orders['judged']:>8}")
    add(f"  Orders flagged        {orders['flagged']:>8}   ({_pct(orders['flagged'], orders['judged'])} of judged)")
    add(f"  Cards shown           {cards['shown']:>8}")
    add(f"  Cards with an outcome {cards['withOutcome']:>8}")
    add(f"    accepted            {fb['accepted']:>8}")
    add(f"    overridden          {fb['overridden']:>8}")
    add(f"  Override rate         {rate:>8}")
    add(
        f"  Latency (ms)          p50 {_ms(latency['p50'])}  p95 {_ms(latency['p95'])}  p99 {_ms(latency['p99'])}"
        f"  max {_ms(latency['max'])}  (n={latency['count']})"
    )
    add("")
    add("Calls by hook")
    width = max([len(f"{h['hook']} ({h['service']})") for h in calls["byHook"]] + [24])
    add(f"  {'hook (service)':<{width}} {'calls':>7} {'answered':>9} {'errors':>7}")
    for h in calls["byHook"]:
        name = f"{h['hook']} ({h['service']})"
        add(f"  {name:<{width}} {h['calls']:>7} {h['answered']:>9} {h['errors']:>7}")
    add("")
    add("Orders flagged by policy")
    for p in orders["byPolicy"] or []:
        add(f"  {p['policy']} {p['version']}: {p['flagged']} flagged of {p['judged']} judged")
    if not orders["byPolicy"]:
        add("  (no orders judged)")
    versions = report["policyVersions"]
    if versions["changed"]:
        add("The policy changed in the period: numbers by version")
        add(f"  {'policy version':<40} {'judged':>7} {'flagged':>8} {'cards':>6} {'overridden':>11}  first - last seen")
        for v in versions["versions"]:
            name = f"{v['policy']} {v['version']}"
            seen = f"{(v['firstSeen'] or '')[:10]} - {(v['lastSeen'] or '')[:10]}"
            add(f"  {name:<40} {v['judged']:>7} {v['flagged']:>8} {v['cards']:>6} {v['overridden']:>11}  {seen}")
    add("Flagged orders by the rule that decided them")
    for r in orders["flaggedByRule"]:
        add(f"  {r['rule']:<32} {r['flagged']:>7}   ({r['policy']} {r['version']})")
    if not orders["flaggedByRule"]:
        add("  (none)")
    add("Flagged orders by deciding evidence (an order may show several kinds)")
    for kind, count in orders["flaggedByEvidenceKind"].items():
        add(f"  {kind:<24} {count:>7}")
    if not orders["flaggedByEvidenceKind"]:
        add("  (none)")
    add("")
    accepted_rows: list[tuple[str, int, str]] = []
    for kind, count in fb["acceptedByKind"].items():
        accepted_rows.append((f"  {kind}", count, _pct(count, fb["accepted"])))
        accepted_rows += [
            (f"    {s['label'] or '(no label)'}", s["count"], "")
            for s in fb["acceptedBySuggestion"]
            if s["kind"] == kind
        ]
    reason_rows: list[tuple[str, int, str]] = []
    comments: dict[int, list[str]] = {}
    for r in fb["overridesByReason"]:
        label = f"{r['code'] or '(no reason coded)'}" + (f": {r['display']}" if r["display"] else "")
        comments[len(reason_rows)] = [
            f'      "{" ".join(c["comment"].split())}"  ({c["at"][:10]}, card {c["card"][:8]})' for c in r["comments"]
        ]
        reason_rows.append((f"  {label}", r["count"], _pct(r["count"], fb["overridden"])))
    width = max([len(label) for label, _, _ in accepted_rows + reason_rows] + [44])
    add(f"{'Accepted cards, by suggestion taken':<{width}} {'cards':>6} {'share':>7}")
    for label, count, share in accepted_rows:
        add(f"{label:<{width}} {count:>6} {share:>7}".rstrip())
    if not accepted_rows:
        add("  (none)")
    add("")
    add(f"{'Overridden cards, by reason (with comments)':<{width}} {'cards':>6} {'share':>7}")
    for index, (label, count, share) in enumerate(reason_rows):
        add(f"{label:<{width}} {count:>6} {share:>7}")
        lines += comments[index]
    if not reason_rows:
        add("  (none)")
    add("")
    add(
        f"Feedback items received: {fb['items']} "
        f"({fb['itemsForUnknownCards']} for cards not in the audit log, stored and left out of the rates)"
    )
    add("")
    alarms = report["falseAlarms"]
    add(f"Possible false alarms: overridden as not what the policy is about ({len(alarms)})")
    for a in alarms:
        add(f"  {a['overriddenAt'][:10]}  {a['rule']:<28} {' '.join(a['orderName'].split())[:70]}")
    if not alarms:
        add("  (none)")
    add("")
    misses = report["possibleMisses"]
    add(f"Possible misses: not flagged by a rule marked for review ({misses['total']})")
    for r in misses["byRule"]:
        add(f"  {r['rule']:<32} {r['orders']:>7}   ({r['policy']} {r['version']})")
    if misses["orders"]:
        add("  Orders (most frequent first):")
    for m in misses["orders"][:50]:
        codes = " ".join(c["code"] for c in m["codes"])
        name = " ".join(m["orderName"].split())[:60] or "(no name recorded)"
        add(f"  {m['count']:>5}  {m['rule']:<28} {name}" + (f"  [{codes}]" if codes else ""))
    if len(misses["orders"]) > 50:
        add(f"  ... and {len(misses['orders']) - 50} other orders (--format json lists them all)")
    if not misses["byRule"]:
        add("  (none)")
    add("")
    add(f"Errors by status ({errors['total']})")
    for e in errors["byStatus"]:
        add(f"  {e['status']}: {e['count']}")
        for r in e["reasons"][:5]:
            add(f"      {r['count']:>5}  {r['reason'][:100]}")
        if len(e["reasons"]) > 5:
            add(f"      ... and {len(e['reasons']) - 5} other reasons")
    if not errors["byStatus"]:
        add("  (none)")
    add("")
    add("How the numbers are counted")
    for definition in report["definitions"]:
        lines += textwrap.wrap(definition, 116, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def render_json(report: dict[str, Any]) -> str:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"


def render_csv(report: dict[str, Any]) -> str:
    """One measure per row (section, measure, detail, value): opens in a spreadsheet as it is."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "measure", "detail", "value"])
    row = writer.writerow
    row(["period", "since", "", report["period"]["since"] or ""])
    row(["period", "until", "", report["period"]["until"]])
    calls = report["calls"]
    for name in ("total", "answered", "errors"):
        row(["calls", name, "", calls[name]])
    for h in calls["byHook"]:
        row(["calls", "by hook", f"{h['hook']} ({h['service']})", h["calls"]])
    orders = report["orders"]
    row(["orders", "judged", "", orders["judged"]])
    row(["orders", "flagged", "", orders["flagged"]])
    for p in orders["byPolicy"]:
        row(["orders", "flagged by policy", f"{p['policy']} {p['version']}", p["flagged"]])
    for r in orders["flaggedByRule"]:
        row(["orders", "flagged by rule", f"{r['policy']} {r['version']} {r['rule']}", r["flagged"]])
    for kind, count in orders["flaggedByEvidenceKind"].items():
        row(["orders", "flagged by evidence kind", kind, count])
    for name in ("shown", "withOutcome", "shownInPeriodWithOutcome"):
        row(["cards", name, "", report["cards"][name]])
    fb = report["feedback"]
    for name in ("items", "itemsForUnknownCards", "accepted", "overridden"):
        row(["feedback", name, "", fb[name]])
    row(["feedback", "overrideRate", "", "" if fb["overrideRate"] is None else fb["overrideRate"]])
    for s in fb["acceptedBySuggestion"]:
        row(["feedback", f"accepted: {s['kind']}", s["label"], s["count"]])
    for r in fb["overridesByReason"]:
        row(["feedback", "overridden: reason", f"{r['code']} {r['display']}".strip(), r["count"]])
        for c in r["comments"]:
            row(["feedback", f"override comment: {r['code']}", c["card"], c["comment"]])
    for name in ("count", "p50", "p95", "p99", "max"):
        value = report["latencyMs"][name]
        row(["latency_ms", name, "", "" if value is None else value])
    for e in report["errors"]["byStatus"]:
        row(["errors", "by status", e["status"], e["count"]])
    for w in report["byWeek"]:
        for name in ("calls", "flagged", "cards", "accepted", "overridden"):
            row(["week", name, w["week"], w[name]])
    for v in report["policyVersions"]["versions"]:
        for name in ("judged", "flagged", "cards", "accepted", "overridden"):
            row(["policy version", name, f"{v['policy']} {v['version']}", v[name]])
    for a in report["falseAlarms"]:
        row(["possible false alarm", a["rule"], a["overriddenAt"], a["orderName"]])
    for r in report["possibleMisses"]["byRule"]:
        row(["possible misses", "by rule", f"{r['policy']} {r['version']} {r['rule']}", r["orders"]])
    for m in report["possibleMisses"]["orders"]:
        row(["possible miss", m["rule"], m["orderName"], m["count"]])
    return out.getvalue()
