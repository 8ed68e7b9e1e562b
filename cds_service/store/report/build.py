"""The report's numbers from the audit log and the feedback tables: read the calls, read the feedback, summarise."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, func, select

from ...engine.outcome import VerdictRecord
from ..db import Database
from ..models import audit_call, audit_card, feedback
from .misses import MissCounter
from .model import (
    AcceptedSuggestion,
    Calls,
    Cards,
    ErrorReason,
    Errors,
    FalseAlarm,
    Feedback,
    HookCalls,
    Latency,
    Orders,
    OverrideComment,
    OverrideReason,
    Period,
    PolicyOrders,
    PolicyVersion,
    PolicyVersions,
    Report,
    RuleCount,
    StatusErrors,
    Tally,
    Week,
)

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
DEFINITIONS = (
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
)
# Override reason codes that say "this card should not have fired" (the policy's not-dsv reason).
FALSE_ALARM_CODES: tuple[str, ...] = ("not-dsv",)
_MAX_WEEKS = 520
_CHUNK = 500
VersionKey = tuple[str, str]


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


@dataclass(frozen=True)
class _CardFacts:
    """What the report says of one card: the policy version that judged its order, the order's name, the rule."""

    policy: str = ""
    version: str = ""
    order_name: str = ""
    rule: str = ""
    shown_at: datetime | None = None


def _card_facts(started_at: datetime, orders: list[Any] | None, cards: list[Any] | None) -> dict[str, _CardFacts]:
    """For each card of one call: the policy version that judged its order, the order's name, the rule, the date."""
    verdicts: dict[tuple[str, str], VerdictRecord] = {}
    for stored in orders or []:
        record = VerdictRecord.from_json(stored)
        if record is not None and record.order:
            verdicts[(record.policy, record.order)] = record
    facts: dict[str, _CardFacts] = {}
    for card in cards or []:
        if not isinstance(card, dict) or not card.get("uuid"):
            continue
        refs = card.get("orders") or []
        verdict = verdicts.get((str(card.get("policy") or ""), refs[0])) if refs else None
        if verdict is None and refs:  # cards written before they named their policy
            verdict = next((v for (_, order), v in verdicts.items() if order == refs[0]), None)
        facts[card["uuid"]] = _CardFacts(
            policy=verdict.policy if verdict else str(card.get("policy") or ""),
            version=verdict.policy_version if verdict else "",
            order_name=str(card.get("orderName") or (verdict.order_name if verdict else "")),
            rule=str(card.get("rule") or (verdict.rule if verdict else "")),
            shown_at=started_at,
        )
    return facts


class _CallRow(NamedTuple):
    """The columns of one audit_call row the report reads."""

    service_id: str
    hook: str | None
    status: int
    error: str | None
    duration_ms: float
    orders: list[Any] | None
    cards: list[Any] | None
    started_at: datetime


class _Item(NamedTuple):
    """One feedback item of the period, linked to its call when the card is in the audit log."""

    id: int
    card_uuid: str
    call_id: str | None
    outcome: str
    accepted_suggestions: list[str] | None
    override_system: str | None
    override_code: str | None
    override_display: str | None
    user_comment: str | None
    outcome_timestamp: datetime


def _counters() -> defaultdict[Any, Counter[str]]:
    return defaultdict(Counter)


@dataclass
class _CallTally:
    """What reading the calls counts: per hook, per policy version, per week, per rule and evidence kind."""

    review_rules: Mapping[str, frozenset[str]]
    weeks: defaultdict[date, Counter[str]] = field(default_factory=_counters)
    by_version: defaultdict[VersionKey, Counter[str]] = field(default_factory=_counters)
    version_seen: dict[VersionKey, list[datetime]] = field(default_factory=dict)
    card_facts: dict[str, _CardFacts] = field(default_factory=dict)
    calls_by_hook: defaultdict[tuple[str, str], Counter[str]] = field(default_factory=_counters)
    judged_by_policy: defaultdict[VersionKey, Counter[str]] = field(default_factory=_counters)
    evidence_kinds: Counter[str] = field(default_factory=Counter)
    by_rule: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    errors: defaultdict[int, Counter[str]] = field(default_factory=_counters)
    durations: list[float] = field(default_factory=list)
    shown: set[str] = field(default_factory=set)
    misses: MissCounter = field(default_factory=MissCounter)
    judged: int = 0
    flagged: int = 0

    def call(self, row: _CallRow) -> None:
        counter = self.calls_by_hook[(row.hook or "", row.service_id)]
        counter["calls"] += 1
        week = self.weeks[_week(row.started_at)]
        week["calls"] += 1
        if row.status != 200:
            counter["errors"] += 1
            self.errors[row.status][row.error or "(no reason recorded)"] += 1
            return
        counter["answered"] += 1
        self.durations.append(float(row.duration_ms))
        for stored in row.orders or []:
            record = VerdictRecord.from_json(stored)
            if record is not None:
                self.order(record, row.started_at, week)
        for card in row.cards or []:
            if card.get("uuid"):
                self.shown.add(card["uuid"])
                week["cards"] += 1
        for uuid, facts in _card_facts(row.started_at, row.orders, row.cards).items():
            self.card_facts[uuid] = facts
            self.by_version[(facts.policy, facts.version)]["cards"] += 1

    def order(self, record: VerdictRecord, started_at: datetime, week: Counter[str]) -> None:
        self.judged += 1
        key = (record.policy, record.policy_version)
        self.judged_by_policy[key]["judged"] += 1
        seen = self.version_seen.setdefault(key, [started_at, started_at])
        seen[0], seen[1] = min(seen[0], started_at), max(seen[1], started_at)
        if not record.flagged and (record.review or record.rule in self.review_rules.get(record.policy, ())):
            self.misses.add(record, started_at)
        if record.flagged:
            self.flagged += 1
            week["flagged"] += 1
            self.judged_by_policy[key]["flagged"] += 1
            self.by_rule[(record.policy, record.policy_version, record.rule)] += 1
            kinds = {e.kind for e in record.deciding or record.evidence_for}
            for kind in sorted(EVIDENCE_KINDS.get(k, k) for k in kinds):
                self.evidence_kinds[kind] += 1


def _read_calls(conn: Connection, tally: _CallTally, since: datetime | None, until: datetime) -> None:
    where = [audit_call.c.started_at < until]
    if since:
        where.append(audit_call.c.started_at >= since)
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
        ).where(*where)
    )
    for row in rows:
        tally.call(_CallRow(*row))


def _read_feedback(
    conn: Connection, tally: _CallTally, since: datetime | None, until: datetime
) -> tuple[list[_Item], dict[str, dict[str, Any]]]:
    """The feedback items of the period in time order, and the suggestions of the cards they answer (by uuid)."""
    where = [feedback.c.outcome_timestamp < until]
    if since:
        where.append(feedback.c.outcome_timestamp >= since)
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
                (audit_card.c.card_uuid == feedback.c.card_uuid) & (audit_card.c.service_id == feedback.c.service_id),
            )
        )
        .where(*where)
        .order_by(feedback.c.outcome_timestamp, feedback.c.id)
    ).all()
    call_ids = sorted({item.call_id for item in items if item.call_id})
    suggestion_of: dict[str, dict[str, Any]] = {}
    for start in range(0, len(call_ids), _CHUNK):
        linked = select(audit_call.c.cards, audit_call.c.orders, audit_call.c.started_at).where(
            audit_call.c.call_id.in_(call_ids[start : start + _CHUNK])
        )
        for cards, orders, started_at in conn.execute(linked):
            for uuid, facts in _card_facts(started_at, orders, cards).items():
                tally.card_facts.setdefault(uuid, facts)
            for card in cards or []:
                for suggestion in card.get("suggestions") or []:
                    if suggestion.get("uuid"):
                        suggestion_of[suggestion["uuid"]] = suggestion
    return [_Item._make(item) for item in items], suggestion_of


@dataclass
class _Outcomes:
    """What clinicians did with the cards: each card's latest feedback item, counted."""

    reason_displays: Mapping[tuple[str, str], str]
    false_alarm_codes: tuple[str, ...]
    latest: dict[str, _Item] = field(default_factory=dict)
    unknown_items: int = 0
    accepted: Counter[tuple[str, str]] = field(default_factory=Counter)
    reasons: defaultdict[tuple[str, str, str], list[OverrideComment]] = field(default_factory=lambda: defaultdict(list))
    accepted_cards: int = 0
    overridden_cards: int = 0
    false_alarms: list[FalseAlarm] = field(default_factory=list)

    def count(self, items: list[_Item], tally: _CallTally, suggestion_of: dict[str, dict[str, Any]]) -> None:
        for item in items:  # ordered by time: the last one wins
            if item.call_id is None:
                self.unknown_items += 1
            else:
                self.latest[item.card_uuid] = item
        for card_uuid, item in sorted(self.latest.items(), key=lambda kv: (kv[1].outcome_timestamp, kv[1].id)):
            facts = tally.card_facts.get(card_uuid, _CardFacts())
            version = tally.by_version[(facts.policy, facts.version)]
            outcome_week = tally.weeks[_week(item.outcome_timestamp)]
            if item.outcome == "accepted":
                outcome_week["accepted"] += 1
                version["accepted"] += 1
                self.accepted_cards += 1
                for suggestion_id in item.accepted_suggestions or []:
                    suggestion = suggestion_of.get(suggestion_id)
                    if suggestion is None:
                        self.accepted[("unknown suggestion", suggestion_id)] += 1
                    else:
                        kind = _suggestion_kind(suggestion.get("actions") or [])
                        self.accepted[(kind, suggestion.get("label") or "")] += 1
            else:
                outcome_week["overridden"] += 1
                version["overridden"] += 1
                self.overridden_cards += 1
                self.override(card_uuid, item, facts)

    def override(self, card_uuid: str, item: _Item, facts: _CardFacts) -> None:
        display = item.override_display or self.reason_displays.get(
            (item.override_system or "", item.override_code or ""), ""
        )
        if item.override_code in self.false_alarm_codes:
            self.false_alarms.append(
                FalseAlarm(
                    card=card_uuid,
                    order_name=facts.order_name,
                    rule=facts.rule,
                    policy=facts.policy,
                    version=facts.version,
                    shown_at=facts.shown_at,
                    overridden_at=item.outcome_timestamp,
                    reason=item.override_code,
                    comment=item.user_comment or "",
                )
            )
        reason_key = (item.override_code or "", display, item.override_system or "")
        self.reasons[reason_key].append(OverrideComment(card_uuid, item.outcome_timestamp, item.user_comment or ""))


def build_report(
    db: Database,
    since: datetime | None = None,
    until: datetime | None = None,
    reason_displays: Mapping[tuple[str, str], str] | None = None,
    false_alarm_codes: tuple[str, ...] = FALSE_ALARM_CODES,
    review_rules: Mapping[str, frozenset[str]] | None = None,
) -> Report:
    """Every number of the report, computed from the audit log and feedback tables.

    `reason_displays` names override reasons by (system, code), from the policies: a client may send the code alone
    (the CDS Hooks sandbox sends {code, system}), and the committee reads the words the card offered.
    """
    until = until or datetime.now(UTC)
    tally = _CallTally(review_rules or {})
    with db.engine.connect() as conn:
        _read_calls(conn, tally, since, until)
        items, suggestion_of = _read_feedback(conn, tally, since, until)
    outcomes = _Outcomes(reason_displays or {}, false_alarm_codes)
    outcomes.count(items, tally, suggestion_of)
    return _summarise(tally, outcomes, len(items), Period(since, until))


def _by_count(counter: Mapping[Any, int]) -> list[tuple[Any, int]]:
    """Most frequent first, then by key."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


def _summarise(tally: _CallTally, outcomes: _Outcomes, items: int, period: Period) -> Report:
    with_outcome = outcomes.accepted_cards + outcomes.overridden_cards
    kinds_accepted = Counter[str]()
    for (kind, _label), count in outcomes.accepted.items():
        kinds_accepted[kind] += count
    orders = Orders(
        judged=tally.judged,
        flagged=tally.flagged,
        by_policy=tuple(
            PolicyOrders(policy, version, c["judged"], c["flagged"])
            for (policy, version), c in sorted(tally.judged_by_policy.items())
        ),
        by_evidence_kind=tuple(Tally(kind, count) for kind, count in _by_count(tally.evidence_kinds)),
        by_rule=tuple(RuleCount(p, v, rule, count) for (p, v, rule), count in _by_count(tally.by_rule)),
    )
    fb = Feedback(
        items=items,
        items_for_unknown_cards=outcomes.unknown_items,
        accepted=outcomes.accepted_cards,
        accepted_by_suggestion=tuple(
            AcceptedSuggestion(kind, label, count) for (kind, label), count in _by_count(outcomes.accepted)
        ),
        accepted_by_kind=tuple(Tally(kind, count) for kind, count in _by_count(kinds_accepted)),
        overridden=outcomes.overridden_cards,
        overrides_by_reason=tuple(
            OverrideReason(code, display, system, len(entries), tuple(e for e in entries if e.comment))
            for (code, display, system), entries in sorted(
                outcomes.reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])
            )
        ),
    )
    return Report(
        period=period,
        calls=Calls(
            tuple(
                HookCalls(hook, service, c["calls"], c["answered"], c["errors"])
                for (hook, service), c in sorted(tally.calls_by_hook.items())
            )
        ),
        orders=orders,
        cards=Cards(len(tally.shown), with_outcome, len(tally.shown & outcomes.latest.keys())),
        feedback=fb,
        latency_ms=_latency(tally.durations),
        errors=Errors(
            tuple(
                StatusErrors(status, tuple(ErrorReason(r, n) for r, n in _by_count(c)))
                for status, c in sorted(tally.errors.items())
            )
        ),
        weeks=_weekly(tally.weeks, period.since, period.until),
        policy_versions=_versions(tally.judged_by_policy, tally.by_version, tally.version_seen),
        false_alarms=tuple(outcomes.false_alarms),
        possible_misses=tally.misses.summary(),
        definitions=DEFINITIONS,
    )


def _latency(durations: list[float]) -> Latency:
    ordered = sorted(durations)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return Latency(
        count=len(ordered),
        p50=ms(percentile(ordered, 0.50)),
        p95=ms(percentile(ordered, 0.95)),
        p99=ms(percentile(ordered, 0.99)),
        max=ms(ordered[-1] if ordered else None),
    )


def _weekly(weeks: Mapping[date, Counter[str]], since: datetime | None, until: datetime) -> tuple[Week, ...]:
    """Every week of the period in order (zeros included, so a chart's weeks are evenly spaced)."""
    if not weeks:
        return ()
    first = _week(since) if since else min(weeks)
    last = max(max(weeks), _week(until - timedelta(microseconds=1)))
    first = max(first, last - timedelta(weeks=_MAX_WEEKS - 1))
    out = []
    day = first
    while day <= last:
        c = weeks.get(day, Counter())
        out.append(Week(day, c["calls"], c["flagged"], c["cards"], c["accepted"], c["overridden"]))
        day += timedelta(weeks=1)
    return tuple(out)


def _versions(
    judged: Mapping[VersionKey, Counter[str]],
    outcomes: Mapping[VersionKey, Counter[str]],
    seen: Mapping[VersionKey, list[datetime]],
) -> PolicyVersions:
    """Numbers per policy version; `changed` when a policy answered with more than one version in the period."""
    rows = []
    for key in sorted(set(judged) | {k for k in outcomes if k != ("", "")}):
        j, o = judged.get(key, Counter()), outcomes.get(key, Counter())
        first_last = seen.get(key)
        rows.append(
            PolicyVersion(
                policy=key[0],
                version=key[1],
                first_seen=first_last[0] if first_last else None,
                last_seen=first_last[1] if first_last else None,
                judged=j["judged"],
                flagged=j["flagged"],
                cards=o["cards"],
                accepted=o["accepted"],
                overridden=o["overridden"],
            )
        )
    policies = Counter(policy for policy, _version in judged)
    return PolicyVersions(any(n > 1 for n in policies.values()), tuple(rows))
