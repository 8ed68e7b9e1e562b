"""The committee report as one self-contained HTML page: pygal charts as inline SVG, no script, nothing fetched."""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any
from xml.etree import ElementTree

# The optional extra `report`: importing this module without it raises ImportError, which the command reports.
import pygal
from pygal.style import Style

from .report.model import Errors, Feedback, Latency, Report, day, iso

# Nothing may load from the network or run: styles are inline, charts are inline SVG, there is no script at all
# (the page shows clinicians' comments and order names, text that must never become markup or code).
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
PALETTE = ("#1f5f8b", "#c0392b", "#e08e0b", "#2e8b57", "#7d3c98", "#566573")
STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    foreground="#222222",
    foreground_strong="#111111",
    foreground_subtle="#888888",
    colors=PALETTE,
    font_family="DejaVu Sans, Liberation Sans, Arial, sans-serif",
    label_font_size=12,
    major_label_font_size=12,
    value_font_size=11,
    title_font_size=15,
    legend_font_size=12,
)

PAGE_CSS = """
body{font-family:"DejaVu Sans","Liberation Sans",Arial,sans-serif;color:#222;margin:0 auto;max-width:1000px;
padding:1.5rem;line-height:1.4}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.2rem;margin:2rem 0 .5rem;border-bottom:1px solid #ccc}
.notice{background:#fdf2e9;border-left:4px solid #e08e0b;padding:.6rem .8rem;margin:1rem 0}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.summary td.n{font-size:1.1rem;font-weight:bold}
figure{margin:.5rem 0}figure svg{width:100%;height:auto;max-height:360px}
details{margin:.3rem 0 1rem}.muted{color:#666;font-size:.9rem}
"""


def _num(path: str, value: Any, shown: str | None = None) -> str:
    """A number cell tied to its place in the JSON report (data-json), so a check can compare them."""
    text = shown if shown is not None else ("n/a" if value is None else str(value))
    return f'<td class="n" data-json="{escape(path)}">{escape(text)}</td>'


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(headers: Iterable[str], rows: Iterable[str], numeric_from: int = 1) -> str:
    head = "".join(
        f'<th class="n">{escape(h)}</th>' if i >= numeric_from else f"<th>{escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(chart: Any, name: str) -> str:
    """The chart as inline SVG, without pygal's script element (tooltips need its JavaScript from a CDN) and
    comments (its links)."""
    tree = chart.render_tree()
    for parent in tree.iter():
        for child in list(parent):
            if not isinstance(child.tag, str) or child.tag.endswith("script"):
                parent.remove(child)
    svg = ElementTree.tostring(tree, encoding="unicode")
    return f'<figure data-chart="{escape(name)}">{svg}</figure>'


def _chart(kind: type[Any], title: str, **config: Any) -> Any:
    options: dict[str, Any] = {
        "style": STYLE,
        "js": [],
        "disable_xml_declaration": True,
        "explicit_size": False,
        "width": 900,
        "height": 320,
        "print_values": True,
        "legend_at_bottom": True,
        "truncate_label": 60,
        "margin": 12,
    }
    options.update(config)
    chart = kind(**options)
    chart.title = title
    return chart


def _weekly(report: Report) -> str:
    weeks = report.weeks
    if not weeks:
        return "<p>No calls in the period.</p>"
    labels = [w.week.isoformat() for w in weeks]
    calls = _chart(pygal.Bar, "Calls per week", show_legend=False, x_label_rotation=30 if len(weeks) > 8 else 0)
    calls.x_labels = labels
    calls.add("calls", [w.calls for w in weeks])
    outcomes = _chart(
        pygal.Bar,
        "Flagged orders, cards, accepted and overridden cards per week",
        x_label_rotation=30 if len(weeks) > 8 else 0,
    )
    outcomes.x_labels = labels
    for key, name in (
        ("flagged", "flagged orders"),
        ("cards", "cards"),
        ("accepted", "accepted"),
        ("overridden", "overridden"),
    ):
        outcomes.add(name, [getattr(w, key) for w in weeks])
    rows = [
        f"<td>{escape(w.week.isoformat())}</td>"
        + "".join(
            _num(f"byWeek.{i}.{k}", getattr(w, k)) for k in ("calls", "flagged", "cards", "accepted", "overridden")
        )
        for i, w in enumerate(weeks)
    ]
    table = _table(["week (Monday)", "calls", "flagged orders", "cards", "accepted", "overridden"], rows)
    return (
        _svg(calls, "weekly-calls")
        + _svg(outcomes, "weekly-outcomes")
        + f"<details><summary>The numbers per week</summary>{table}</details>"
    )


def _acceptance(fb: Feedback) -> str:
    items = fb.accepted_by_suggestion
    if not items:
        return "<p>No card was accepted in the period.</p>"
    chart = _chart(
        pygal.HorizontalBar,
        "Accepted cards by suggestion taken",
        show_legend=False,
        height=max(200, 60 + 40 * len(items)),
    )
    chart.x_labels = [s.label or s.kind for s in items]
    chart.add("cards", [s.count for s in items])
    rows = [
        f"<td>{escape(s.kind)}</td><td>{escape(s.label or '(no label)')}</td>"
        + _num(f"feedback.acceptedBySuggestion.{i}.count", s.count)
        for i, s in enumerate(items)
    ]
    return _svg(chart, "acceptance") + _table(["kind", "suggestion", "cards"], rows, numeric_from=2)


def _overrides(fb: Feedback) -> str:
    reasons = fb.overrides_by_reason
    if not reasons:
        return "<p>No card was overridden in the period.</p>"
    chart = _chart(
        pygal.HorizontalBar, "Overridden cards by reason", show_legend=False, height=max(200, 60 + 40 * len(reasons))
    )
    chart.x_labels = [r.display or r.code or "(no reason coded)" for r in reasons]
    chart.add("cards", [r.count for r in reasons])
    rows = []
    for i, r in enumerate(reasons):
        comments = "".join(
            f"<li>{escape(c.comment)} <span class=muted>({escape(day(c.at))})</span></li>" for c in r.comments
        )
        rows.append(
            f"<td>{escape(r.code or '(none)')}</td><td>{escape(r.display)}</td>"
            + _num(f"feedback.overridesByReason.{i}.count", r.count)
            + f"<td><ul>{comments}</ul></td>"
        )
    return _svg(chart, "overrides") + _table(["code", "reason", "cards", "clinicians' comments"], rows, numeric_from=2)


def _latency(latency: Latency) -> str:
    if not latency.count:
        return "<p>No answered call in the period.</p>"
    names = ("p50", "p95", "p99", "max")
    chart = _chart(pygal.Bar, "Latency of answered calls (ms)", show_legend=False)
    chart.x_labels = list(names)
    chart.add("ms", [getattr(latency, n) for n in names])
    rows = ["".join(_num(f"latencyMs.{n}", getattr(latency, n)) for n in (*names, "count"))]
    return _svg(chart, "latency") + _table(["p50 ms", "p95 ms", "p99 ms", "max ms", "calls"], rows, numeric_from=0)


def _errors(errors: Errors) -> str:
    statuses = errors.by_status
    if not statuses:
        return "<p>No errors in the period.</p>"
    chart = _chart(pygal.Bar, "Errors by HTTP status", show_legend=False)
    chart.x_labels = [str(e.status) for e in statuses]
    chart.add("calls", [e.count for e in statuses])
    rows = []
    for i, e in enumerate(statuses):
        reasons = "".join(f"<li>{escape(r.reason[:200])}: {r.count}</li>" for r in e.reasons[:10])
        rows.append(
            f"<td>{e.status}</td>" + _num(f"errors.byStatus.{i}.count", e.count) + f"<td><ul>{reasons}</ul></td>"
        )
    return _svg(chart, "errors") + _table(["status", "calls", "most frequent reasons"], rows)


def _versions(report: Report) -> str:
    versions = report.policy_versions
    rows = [
        f"<td>{escape(v.policy)}</td><td>{escape(v.version)}</td>"
        f"<td>{escape(day(v.first_seen))} to {escape(day(v.last_seen))}</td>"
        + "".join(
            _num(f"policyVersions.versions.{i}.{k}", getattr(v, k))
            for k in ("judged", "flagged", "cards", "accepted", "overridden")
        )
        + _num(f"policyVersions.versions.{i}.overrideRate", v.override_rate, _pct(v.override_rate))
        for i, v in enumerate(versions.versions)
    ]
    note = (
        "<p><strong>The policy changed during the period:</strong> compare the versions before reading the totals.</p>"
        if versions.changed
        else "<p class=muted>One version per policy answered in the period.</p>"
    )
    headers = ["policy", "version", "seen", "judged", "flagged", "cards", "accepted", "overridden", "override rate"]
    return note + _table(headers, rows, numeric_from=3)


def _false_alarms(report: Report) -> str:
    rows = [
        f'<td data-field="orderName">{escape(a.order_name or "(no name recorded)")}</td>'
        f'<td data-field="shownAt">{escape(day(a.shown_at))}</td>'
        f'<td data-field="overriddenAt">{escape(day(a.overridden_at))}</td>'
        f'<td data-field="rule">{escape(a.rule)}</td>'
        f"<td>{escape(a.policy)} {escape(a.version)}</td>"
        f"<td>{escape(a.comment)}</td>"
        for a in report.false_alarms
    ]
    if not rows:
        return "<p>None in the period.</p>"
    table = _table(["order", "card shown", "overridden", "rule that fired", "policy version", "comment"], rows, 9)
    return table.replace("<table>", '<table id="false-alarms">', 1)


def _possible_misses(report: Report) -> str:
    misses = report.possible_misses
    if not misses.by_rule:
        return "<p>None in the period.</p>"
    by_rule = _table(
        ["rule marked for review", "policy version", "orders"],
        [
            f'<td data-field="rule">{escape(r.rule)}</td><td>{escape(r.policy)} {escape(r.version)}</td>'
            + _num(f"possibleMisses.byRule.{i}.orders", r.count)
            for i, r in enumerate(misses.by_rule)
        ],
        numeric_from=2,
    ).replace("<table>", '<table id="possible-misses-by-rule">', 1)
    orders = _table(
        ["order", "codes", "rule", "last seen", "times"],
        [
            f'<td data-field="orderName">{escape(m.order_name or "(no name recorded)")}</td>'
            f"<td>{escape(' '.join(c.code for c in m.codes))}</td>"
            f'<td data-field="rule">{escape(m.rule)}</td>'
            f"<td>{escape(day(m.last_seen))}</td>" + _num(f"possibleMisses.orders.{i}.count", m.count)
            for i, m in enumerate(misses.orders)
        ],
        numeric_from=4,
    ).replace("<table>", '<table id="possible-misses">', 1)
    note = (
        "<p class=muted>Not flagged by a rule the policy marks <code>review: true</code>: a miss raises no card, so "
        "no clinician reports it. <code>cds-service report --possible-misses --format json</code> writes these orders "
        "as labelled examples with an empty label.</p>"
    )
    return note + by_rule + orders


def render_html(report: Report) -> str:
    since = iso(report.period.since) if report.period.since else "the first record"
    title = f"CDS service report: {since} to {iso(report.period.until)} (UTC)"
    calls, orders, cards, fb = report.calls, report.orders, report.cards, report.feedback
    summary = _table(
        ["measure", "value"],
        [
            "<td>Calls</td>" + _num("calls.total", calls.total),
            "<td>Calls with an error</td>" + _num("calls.errors", calls.errors),
            "<td>Orders judged</td>" + _num("orders.judged", orders.judged),
            "<td>Orders flagged</td>" + _num("orders.flagged", orders.flagged),
            "<td>Cards shown</td>" + _num("cards.shown", cards.shown),
            "<td>Cards accepted</td>" + _num("feedback.accepted", fb.accepted),
            "<td>Cards overridden</td>" + _num("feedback.overridden", fb.overridden),
            "<td>Override rate</td>" + _num("feedback.overrideRate", fb.override_rate, _pct(fb.override_rate)),
            "<td>Possible false alarms</td>" + _num("falseAlarms.length", len(report.false_alarms)),
            "<td>Possible misses</td>" + _num("possibleMisses.total", report.possible_misses.total),
        ],
    ).replace("<table>", '<table class="summary">', 1)
    definitions = "".join(f"<li>{escape(d)}</li>" for d in report.definitions)
    sections = [
        ("summary", "Summary", summary),
        ("weekly", "Per week", _weekly(report)),
        ("acceptance", "Acceptance by suggestion", _acceptance(fb)),
        ("overrides", "Overrides by reason", _overrides(fb)),
        (
            "false-alarms-section",
            "Possible false alarms (overridden as not a dynamic spinal study)",
            _false_alarms(report),
        ),
        (
            "possible-misses-section",
            "Possible misses (not flagged by a rule marked for review)",
            _possible_misses(report),
        ),
        ("versions", "By policy version", _versions(report)),
        ("latency", "Latency", _latency(report.latency_ms)),
        ("errors", "Errors by status", _errors(report.errors)),
        ("definitions", "How the numbers are counted", f"<ul>{definitions}</ul>"),
    ]
    body = "".join(
        f'<section id="{sid}"><h2>{escape(heading)}</h2>{content}</section>' for sid, heading, content in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"<header><h1>{escape(title)}</h1>"
        '<p class="notice" id="patient-data"><strong>Contains patient-related data</strong> from the audit log: order '
        "names, dates and clinicians' comments. Share it only with those allowed to read the audit log, and do not "
        "post it where others can open it.</p></header>"
        f"{body}</body></html>\n"
    )
