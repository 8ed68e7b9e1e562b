"""The report as text for the committee, as CSV for a spreadsheet, and as JSON (its public shape)."""

from __future__ import annotations

import csv
import io
import textwrap

import orjson

from .model import Feedback, Report, day, iso


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render_text(report: Report) -> str:
    """The report as a committee reads it: headline numbers first, then the detail, aligned."""
    since = iso(report.period.since) if report.period.since else "the first record"
    title = f"CDS service report: {since} to {iso(report.period.until)} (UTC)"
    lines = [title, "=" * len(title), ""]
    for section in (_summary, _calls_and_orders, _feedback_text, _alarms_and_misses, _errors_text):
        lines += section(report)
    lines.append("How the numbers are counted")
    for definition in report.definitions:
        lines += textwrap.wrap(definition, 116, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def _summary(report: Report) -> list[str]:
    calls, orders, fb, latency = report.calls, report.orders, report.feedback, report.latency_ms
    rate = "n/a" if fb.override_rate is None else f"{100 * fb.override_rate:.1f}%"
    return [
        "Summary",
        f"  Calls                 {calls.total:>8}   ({calls.errors} errors)",
        f"  Orders judged         {orders.judged:>8}",
        f"  Orders flagged        {orders.flagged:>8}   ({_pct(orders.flagged, orders.judged)} of judged)",
        f"  Cards shown           {report.cards.shown:>8}",
        f"  Cards with an outcome {report.cards.with_outcome:>8}",
        f"    accepted            {fb.accepted:>8}",
        f"    overridden          {fb.overridden:>8}",
        f"  Override rate         {rate:>8}",
        f"  Latency (ms)          p50 {_ms(latency.p50)}  p95 {_ms(latency.p95)}  p99 {_ms(latency.p99)}"
        f"  max {_ms(latency.max)}  (n={latency.count})",
        "",
    ]


def _calls_and_orders(report: Report) -> list[str]:
    calls, orders, versions = report.calls, report.orders, report.policy_versions
    lines = ["Calls by hook"]
    width = max([len(f"{h.hook} ({h.service})") for h in calls.by_hook] + [24])
    lines.append(f"  {'hook (service)':<{width}} {'calls':>7} {'answered':>9} {'errors':>7}")
    for h in calls.by_hook:
        name = f"{h.hook} ({h.service})"
        lines.append(f"  {name:<{width}} {h.calls:>7} {h.answered:>9} {h.errors:>7}")
    lines += ["", "Orders flagged by policy"]
    lines += [f"  {p.policy} {p.version}: {p.flagged} flagged of {p.judged} judged" for p in orders.by_policy]
    if not orders.by_policy:
        lines.append("  (no orders judged)")
    if versions.changed:
        lines.append("The policy changed in the period: numbers by version")
        lines.append(
            f"  {'policy version':<40} {'judged':>7} {'flagged':>8} {'cards':>6} {'overridden':>11}  first - last seen"
        )
        for v in versions.versions:
            name = f"{v.policy} {v.version}"
            seen = f"{day(v.first_seen)} - {day(v.last_seen)}"
            lines.append(f"  {name:<40} {v.judged:>7} {v.flagged:>8} {v.cards:>6} {v.overridden:>11}  {seen}")
    lines.append("Flagged orders by the rule that decided them")
    lines += [f"  {r.rule:<32} {r.count:>7}   ({r.policy} {r.version})" for r in orders.by_rule]
    if not orders.by_rule:
        lines.append("  (none)")
    lines.append("Flagged orders by deciding evidence (an order may show several kinds)")
    lines += [f"  {t.name:<24} {t.count:>7}" for t in orders.by_evidence_kind]
    if not orders.by_evidence_kind:
        lines.append("  (none)")
    lines.append("")
    return lines


def _feedback_rows(fb: Feedback) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str, list[str]]]]:
    """The accepted rows (kind, then its suggestions) and the override rows (reason, with its comments)."""
    accepted_rows: list[tuple[str, int, str]] = []
    for kind in fb.accepted_by_kind:
        accepted_rows.append((f"  {kind.name}", kind.count, _pct(kind.count, fb.accepted)))
        accepted_rows += [
            (f"    {s.label or '(no label)'}", s.count, "") for s in fb.accepted_by_suggestion if s.kind == kind.name
        ]
    reason_rows: list[tuple[str, int, str, list[str]]] = []
    for r in fb.overrides_by_reason:
        label = f"{r.code or '(no reason coded)'}" + (f": {r.display}" if r.display else "")
        comments = [f'      "{" ".join(c.comment.split())}"  ({day(c.at)}, card {c.card[:8]})' for c in r.comments]
        reason_rows.append((f"  {label}", r.count, _pct(r.count, fb.overridden), comments))
    return accepted_rows, reason_rows


def _feedback_text(report: Report) -> list[str]:
    fb = report.feedback
    accepted_rows, reason_rows = _feedback_rows(fb)
    width = max([len(row[0]) for row in accepted_rows + reason_rows] + [44])
    lines = [f"{'Accepted cards, by suggestion taken':<{width}} {'cards':>6} {'share':>7}"]
    lines += [f"{label:<{width}} {count:>6} {share:>7}".rstrip() for label, count, share in accepted_rows]
    if not accepted_rows:
        lines.append("  (none)")
    lines += ["", f"{'Overridden cards, by reason (with comments)':<{width}} {'cards':>6} {'share':>7}"]
    for label, count, share, comments in reason_rows:
        lines.append(f"{label:<{width}} {count:>6} {share:>7}")
        lines += comments
    if not reason_rows:
        lines.append("  (none)")
    lines += [
        "",
        f"Feedback items received: {fb.items} "
        f"({fb.items_for_unknown_cards} for cards not in the audit log, stored and left out of the rates)",
        "",
    ]
    return lines


def _alarms_and_misses(report: Report) -> list[str]:
    alarms, misses = report.false_alarms, report.possible_misses
    lines = [f"Possible false alarms: overridden as not what the policy is about ({len(alarms)})"]
    lines += [f"  {day(a.overridden_at)}  {a.rule:<28} {' '.join(a.order_name.split())[:70]}" for a in alarms]
    if not alarms:
        lines.append("  (none)")
    lines += ["", f"Possible misses: not flagged by a rule marked for review ({misses.total})"]
    lines += [f"  {r.rule:<32} {r.count:>7}   ({r.policy} {r.version})" for r in misses.by_rule]
    if misses.orders:
        lines.append("  Orders (most frequent first):")
    for m in misses.orders[:50]:
        codes = " ".join(c.code for c in m.codes)
        name = " ".join(m.order_name.split())[:60] or "(no name recorded)"
        lines.append(f"  {m.count:>5}  {m.rule:<28} {name}" + (f"  [{codes}]" if codes else ""))
    if len(misses.orders) > 50:
        lines.append(f"  ... and {len(misses.orders) - 50} other orders (--format json lists them all)")
    if not misses.by_rule:
        lines.append("  (none)")
    lines.append("")
    return lines


def _errors_text(report: Report) -> list[str]:
    errors = report.errors
    lines = [f"Errors by status ({errors.total})"]
    for e in errors.by_status:
        lines.append(f"  {e.status}: {e.count}")
        lines += [f"      {r.count:>5}  {r.reason[:100]}" for r in e.reasons[:5]]
        if len(e.reasons) > 5:
            lines.append(f"      ... and {len(e.reasons) - 5} other reasons")
    if not errors.by_status:
        lines.append("  (none)")
    lines.append("")
    return lines


def render_json(report: Report) -> str:
    return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n"


def render_csv(report: Report) -> str:
    """One measure per row (section, measure, detail, value): opens in a spreadsheet as it is."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "measure", "detail", "value"])
    for row in _csv_rows(report):
        writer.writerow(row)
    return out.getvalue()


def _csv_rows(report: Report) -> list[list[object]]:
    calls, orders, cards, fb, latency = report.calls, report.orders, report.cards, report.feedback, report.latency_ms
    rows: list[list[object]] = [
        ["period", "since", "", iso(report.period.since) if report.period.since else ""],
        ["period", "until", "", iso(report.period.until)],
        ["calls", "total", "", calls.total],
        ["calls", "answered", "", calls.answered],
        ["calls", "errors", "", calls.errors],
    ]
    rows += [["calls", "by hook", f"{h.hook} ({h.service})", h.calls] for h in calls.by_hook]
    rows += [["orders", "judged", "", orders.judged], ["orders", "flagged", "", orders.flagged]]
    rows += [["orders", "flagged by policy", f"{p.policy} {p.version}", p.flagged] for p in orders.by_policy]
    rows += [["orders", "flagged by rule", f"{r.policy} {r.version} {r.rule}", r.count] for r in orders.by_rule]
    rows += [["orders", "flagged by evidence kind", t.name, t.count] for t in orders.by_evidence_kind]
    rows += [
        ["cards", "shown", "", cards.shown],
        ["cards", "withOutcome", "", cards.with_outcome],
        ["cards", "shownInPeriodWithOutcome", "", cards.shown_in_period_with_outcome],
        ["feedback", "items", "", fb.items],
        ["feedback", "itemsForUnknownCards", "", fb.items_for_unknown_cards],
        ["feedback", "accepted", "", fb.accepted],
        ["feedback", "overridden", "", fb.overridden],
        ["feedback", "overrideRate", "", "" if fb.override_rate is None else fb.override_rate],
    ]
    rows += [["feedback", f"accepted: {s.kind}", s.label, s.count] for s in fb.accepted_by_suggestion]
    for r in fb.overrides_by_reason:
        rows.append(["feedback", "overridden: reason", f"{r.code} {r.display}".strip(), r.count])
        rows += [["feedback", f"override comment: {r.code}", c.card, c.comment] for c in r.comments]
    measures = {"count": latency.count, "p50": latency.p50, "p95": latency.p95, "p99": latency.p99, "max": latency.max}
    rows += [["latency_ms", name, "", "" if value is None else value] for name, value in measures.items()]
    rows += [["errors", "by status", e.status, e.count] for e in report.errors.by_status]
    for w in report.weeks:
        for name, count in (
            ("calls", w.calls),
            ("flagged", w.flagged),
            ("cards", w.cards),
            ("accepted", w.accepted),
            ("overridden", w.overridden),
        ):
            rows.append(["week", name, w.week.isoformat(), count])
    for v in report.policy_versions.versions:
        for name, count in (
            ("judged", v.judged),
            ("flagged", v.flagged),
            ("cards", v.cards),
            ("accepted", v.accepted),
            ("overridden", v.overridden),
        ):
            rows.append(["policy version", name, f"{v.policy} {v.version}", count])
    rows += [["possible false alarm", a.rule, iso(a.overridden_at), a.order_name] for a in report.false_alarms]
    misses = report.possible_misses
    rows += [["possible misses", "by rule", f"{r.policy} {r.version} {r.rule}", r.count] for r in misses.by_rule]
    rows += [["possible miss", m.rule, m.order_name, m.count] for m in misses.orders]
    return rows
