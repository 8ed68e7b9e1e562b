"""The report's weekly series, policy versions and false alarms; the HTML page, opened offline in real Chromium."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cds_service.audit import CallRecord, Identity
from cds_service.cli import main
from cds_service.engine.outcome import CardRecord, VerdictRecord
from cds_service.store import Store
from cds_service.store.report import build_report
from cds_service.web.feedback import parse_feedback

from .chromium_support import chromium, open_offline
from .conftest import SIGN
from .process_support import cds_service_command
from .store_support import card_record, store_for, verdict_record
from .test_report import DAY, NOW, POLICY, REASONS, SINCE, at, known_calls, known_feedback

# A fixed period of four weeks (Monday 2026-10-05 to Monday 2026-11-02), the policy changing in the third.
START = datetime(2026, 10, 5, tzinfo=UTC)
END = START + timedelta(weeks=4)


def week_of(moment: datetime) -> str:
    day = moment.date()
    return (day - timedelta(days=day.weekday())).isoformat()


def test_weekly_versions_and_false_alarms_of_the_known_log(db_url: str) -> None:
    store = store_for(db_url)
    known_calls(store)
    known_feedback(store)
    report = build_report(store.db, since=SINCE).to_json()
    store.close()

    weeks: dict[str, Counter[str]] = {}
    first = datetime.fromisoformat(week_of(SINCE)).date()
    while first <= NOW.date():
        weeks[first.isoformat()] = Counter()
        first += timedelta(weeks=1)
    weeks[week_of(DAY)].update(calls=108, flagged=10, cards=10)
    # Latest outcome per known card: 1, 2, 3, 9 accepted at +5 min, 7 at +9; 4, 5, 6 overridden at +5, 8 at +9.
    for minutes, outcome, count in ((5, "accepted", 4), (9, "accepted", 1), (5, "overridden", 3), (9, "overridden", 1)):
        weeks[week_of(DAY + timedelta(minutes=minutes))][outcome] += count
    assert report["byWeek"] == [
        {"week": week, **{k: c[k] for k in ("calls", "flagged", "cards", "accepted", "overridden")}}
        for week, c in weeks.items()
    ]

    day = DAY.isoformat().replace("+00:00", "Z")
    assert report["policyVersions"] == {
        "changed": False,
        "versions": [
            {
                "policy": POLICY,
                "version": "2026.11.0",
                "firstSeen": day,
                "lastSeen": day,
                "judged": 106,
                "flagged": 10,
                "cards": 10,
                "accepted": 5,
                "overridden": 4,
                "overrideRate": 0.4444,
            }
        ],
    }
    # Cards 4 and 5 were overridden as "not a dynamic spinal study"; the card for an unknown uuid is not listed.
    assert report["falseAlarms"] == [
        {
            "card": f"card-{n}",
            "orderName": "",
            "rule": "technique-on-spine",
            "policy": POLICY,
            "version": "2026.11.0",
            "shownAt": day,
            "overriddenAt": at(5),
            "reason": "not-dsv",
            "comment": comment,
        }
        for n, comment in ((4, "It is a plain flexion/extension study"), (5, ""))
    ]


def verdict(version: str, flagged: bool, name: str, rule: str) -> VerdictRecord:
    return verdict_record(
        {
            "v": 2,
            "order": "ServiceRequest/sr1",
            "orderName": name,
            "policy": POLICY,
            "policyVersion": version,
            "verdict": "flagged" if flagged else "not-flagged",
            "rule": rule,
            "reason": "test",
            "deciding": [],
            "evidenceFor": [],
            "evidenceAgainst": [],
        }
    )


def shown_card(uuid: str, name: str, rule: str) -> CardRecord:
    return card_record(
        {
            "uuid": uuid,
            "kind": "guideline",
            "indicator": "warning",
            "topic": "guideline",
            "policy": POLICY,
            "rule": rule,
            "orders": ["ServiceRequest/sr1"],
            "orderName": name,
            "suggestions": [
                {"uuid": f"{uuid}-remove", "label": "Remove the order", "kind": "remove", "actions": ["delete"]},
                {
                    "uuid": f"{uuid}-switch",
                    "label": "Replace with flexion/extension radiographs of the lumbar spine",
                    "kind": "replace",
                    "actions": ["delete", "create"],
                },
            ],
        }
    )


NAMES = ("DMX cervical spine", "Videofluoroscopy lumbar spine <b>motion</b>", "Kinematic MRI C-spine")


def four_weeks(store: Store) -> None:
    """Calls in each of four weeks (more each week), version 1.0 in the first two, 2.0 in the last two; every third
    flagged call's card overridden as not-dsv, the others alternately accepted and overridden for research."""
    items: list[dict[str, Any]] = []
    n = 0
    for week in range(4):
        version = "1.0" if week < 2 else "2.0"
        for call in range(5 + 3 * week):
            n += 1
            started = START + timedelta(weeks=week, days=call % 5, hours=9, minutes=call)
            flagged = call % 2 == 0
            name = NAMES[n % len(NAMES)]
            rule = "technique-named" if n % 2 else "billing-code"
            cards = [shown_card(f"c{n}", name, rule)] if flagged else []
            store.writer.record(
                CallRecord(
                    service_id=SIGN,
                    hook="order-sign",
                    started_at=started,
                    orders=[verdict(version, flagged, name, rule)],
                    cards=cards,
                    duration_ms=float(n),
                )
            )
            if flagged:
                when = (started + timedelta(minutes=3)).isoformat().replace("+00:00", "Z")
                if n % 3 == 0:
                    reason = {"system": REASONS, "code": "not-dsv", "display": "Not a dynamic spinal study"}
                    items.append(
                        {
                            "card": f"c{n}",
                            "outcome": "overridden",
                            "outcomeTimestamp": when,
                            "overrideReason": {"reason": reason, "userComment": "plain flexion/extension <i>study</i>"},
                        }
                    )
                elif n % 2:
                    items.append(
                        {
                            "card": f"c{n}",
                            "outcome": "accepted",
                            "acceptedSuggestions": [{"id": f"c{n}-switch"}],
                            "outcomeTimestamp": when,
                        }
                    )
                else:
                    reason = {"system": REASONS, "code": "research-study", "display": "Research study"}
                    items.append(
                        {
                            "card": f"c{n}",
                            "outcome": "overridden",
                            "outcomeTimestamp": when,
                            "overrideReason": {"reason": reason},
                        }
                    )
        if week == 1:
            store.writer.record(
                CallRecord(
                    service_id=SIGN,
                    hook="order-sign",
                    started_at=START + timedelta(weeks=week, days=2),
                    status=400,
                    error="bad json",
                    duration_ms=1.0,
                )
            )
    assert store.writer.flush(20)
    store.save_feedback(SIGN, parse_feedback({"feedback": items}), Identity())


def test_a_policy_change_in_the_period_splits_the_numbers_by_version(db_url: str) -> None:
    store = store_for(db_url)
    four_weeks(store)
    report = build_report(store.db, since=START, until=END).to_json()
    store.close()
    versions = report["policyVersions"]
    assert versions["changed"] is True
    assert [(v["version"], v["judged"], v["flagged"]) for v in versions["versions"]] == [
        ("1.0", 13, 7),
        ("2.0", 25, 13),
    ]
    assert sum(v["cards"] for v in versions["versions"]) == report["cards"]["shown"] == 20
    assert [w["calls"] for w in report["byWeek"]] == [5, 9, 11, 14]
    assert sum(w["overridden"] for w in report["byWeek"]) == report["feedback"]["overridden"]
    assert {a["version"] for a in report["falseAlarms"]} == {"1.0", "2.0"}
    assert all(a["reason"] == "not-dsv" and a["orderName"] in NAMES for a in report["falseAlarms"])


def test_html_without_the_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # pygal absent, as in a plain `pip install .`: an import of it fails.
    monkeypatch.setitem(sys.modules, "pygal", None)
    monkeypatch.delitem(sys.modules, "cds_service.store.report_html", raising=False)
    monkeypatch.setenv("CDS_DATABASE_URL", f"sqlite:///{tmp_path / 'none.sqlite3'}")
    assert main(["report", "--format", "html", "--output", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err
    assert "pip install 'cds-service[report]'" in error and "extra 'report'" in error
    assert not (tmp_path / "r.html").exists()


# Everything the check needs from the rendered page, collected in the browser.
PAGE_FACTS = """(() => {
  const charts = [...document.querySelectorAll('figure[data-chart]')].map(figure => {
    const svg = figure.querySelector('svg');
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll('rect.rect')].filter(r => {
      const b = r.getBBox(); return b.width > 0.5 && b.height > 0.5; });
    return {name: figure.dataset.chart, width: box.width, height: box.height, bars: bars.length,
            values: [...svg.querySelectorAll('desc.value')].map(d => d.textContent)};
  });
  const numbers = [...document.querySelectorAll('[data-json]')].map(e => [e.dataset.json, e.textContent]);
  const alarms = [...document.querySelectorAll('table#false-alarms tbody tr')].map(tr =>
    Object.fromEntries([...tr.querySelectorAll('td[data-field]')].map(td => [td.dataset.field, td.textContent])));
  return {charts, numbers, alarms, scripts: document.scripts.length,
          notice: (document.querySelector('#patient-data') || {}).textContent || '',
          injected: document.querySelectorAll('b, i').length};
})()"""


def resolve(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for part in path.split("."):
        if part == "length":
            return len(value)
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def shown_equals(text: str, value: Any) -> bool:
    if value is None:
        return text == "n/a"
    if text.endswith("%"):
        return bool(float(text[:-1]) == round(100 * value, 1))
    return float(text) == float(value)


@pytest.mark.slow
def test_the_page_opened_offline_in_chromium_shows_the_json_numbers(tmp_path: Path) -> None:
    if chromium() is None:
        pytest.fail("Chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    url = f"sqlite:///{tmp_path / 'report.sqlite3'}"
    store = store_for(url)
    four_weeks(store)
    store.close()
    env = {**os.environ, "CDS_DATABASE_URL": url}
    period = ["--since", START.date().isoformat(), "--until", END.date().isoformat()]
    page = tmp_path / "report.html"
    for fmt, out in (("html", page), ("json", tmp_path / "report.json")):
        subprocess.run(
            [*cds_service_command(), "report", *period, "--format", fmt, "--output", str(out)],
            env=env,
            check=True,
            timeout=120,
        )
    report = json.loads((tmp_path / "report.json").read_text())
    html = page.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/", "")

    screenshot = tmp_path / "report.png"
    facts, requested = open_offline(page, screenshot, PAGE_FACTS)
    # Offline and self-contained: the page asked for nothing but itself, and runs no script.
    assert requested == [page.resolve().as_uri()]
    assert facts["scripts"] == 0
    assert "patient-related data" in facts["notice"]
    # Markup in order names and comments stays text.
    assert facts["injected"] == 0

    charts = {c["name"]: c for c in facts["charts"]}
    assert set(charts) == {"weekly-calls", "weekly-outcomes", "acceptance", "overrides", "latency", "errors"}
    for chart in charts.values():
        assert chart["width"] > 300 and chart["height"] > 100, chart
        nonzero = [v for v in chart["values"] if float(v) != 0]
        assert chart["bars"] == len(nonzero) > 0, chart
    weeks = report["byWeek"]
    assert [float(v) for v in charts["weekly-calls"]["values"]] == [w["calls"] for w in weeks]
    series = [w[k] for k in ("flagged", "cards", "accepted", "overridden") for w in weeks]
    assert [float(v) for v in charts["weekly-outcomes"]["values"]] == series
    assert [float(v) for v in charts["overrides"]["values"]] == [
        r["count"] for r in report["feedback"]["overridesByReason"]
    ]
    latency = report["latencyMs"]
    assert [float(v) for v in charts["latency"]["values"]] == [latency[k] for k in ("p50", "p95", "p99", "max")]

    numbers = facts["numbers"]
    assert len(numbers) > 40
    for path, text in numbers:
        assert shown_equals(text, resolve(report, path)), (path, text, resolve(report, path))

    assert facts["alarms"] == [
        {
            "orderName": a["orderName"],
            "shownAt": a["shownAt"][:10],
            "overriddenAt": a["overriddenAt"][:10],
            "rule": a["rule"],
        }
        for a in report["falseAlarms"]
    ]
    assert len(facts["alarms"]) == len(report["falseAlarms"]) > 0

    # The screenshot is a real picture of the page (PNG, the window's width less a scroll bar, longer than a screen).
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 1000 < width <= 1100 and height > 900
