"""The packaged policy's labelled examples (policies/examples/): precision and recall of 1.0, explanations that name
the evidence, and the same verdicts through order-select and order-sign."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service.engine import Policy, Verdict, describe, explain_lines, judge, load_policies, read_order

from .builders import hook_request
from .conftest import ROOT, SELECT, SIGN

CORPUS = ROOT / "policies" / "examples"
GROUPS = sorted(p.stem for p in CORPUS.glob("*.json"))
LABELS = ("dsv", "not-dsv")
TECHNIQUES = ("technique", "ambiguous-technique")
# Where the shipped policy reads techniques: the order's own fields, notes and reasons' free text, and the suite,
# clinic or form it names.
TECHNIQUE_PLACES = (
    "code",
    "detail",
    "body_site",
    "note",
    "instruction",
    "reason",
    "category",
    "performer",
    "location",
    "supporting_info",
)


@cache
def policy() -> Policy:
    return next(p for p in load_policies().policies if p.id == "dynamic-spinal-visualization")


def load_group(group: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((CORPUS / f"{group}.json").read_text(encoding="utf-8"))
    return cases


@cache
def corpus() -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple((group, case) for group in GROUPS for case in load_group(group))


def test_the_corpus_is_large_varied_and_well_formed() -> None:
    cases = [case for _, case in corpus()]
    assert len(cases) >= 170
    ids = [case["id"] for case in cases]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    for case in cases:
        assert set(case) == {"id", "label", "why", "resource"}, case["id"]
        assert case["label"] in LABELS, case["id"]
        assert case["why"].strip() and "\n" not in case["why"], case["id"]
        assert case["resource"]["resourceType"] == "ServiceRequest", case["id"]
        assert case["resource"]["id"] == case["id"], "resource ids double as case ids in the hook requests"
    labels = Counter(case["label"] for case in cases)
    assert labels["dsv"] >= 60 and labels["not-dsv"] >= 60, labels
    shapes = Counter(read_order(case["resource"]).shape for case in cases)
    assert shapes["R4"] >= 30 and shapes["R5"] >= 30, shapes


def _wrong(cases: list[tuple[str, dict[str, Any], Verdict]]) -> str:
    lines = []
    for group, case, verdict in cases:
        lines.append(f"[{group}] {case['id']} expected {case['label']}: {case['why']}")
        lines.extend("    " + line for line in describe(verdict).splitlines())
    return "\n".join(lines)


def test_precision_and_recall_are_one() -> None:
    judged = [(group, case, judge(read_order(case["resource"]), policy())) for group, case in corpus()]
    tp = sum(1 for _, case, v in judged if v.flagged and case["label"] == "dsv")
    false_pos = [(g, case, v) for g, case, v in judged if v.flagged and case["label"] == "not-dsv"]
    false_neg = [(g, case, v) for g, case, v in judged if not v.flagged and case["label"] == "dsv"]
    precision = tp / (tp + len(false_pos)) if tp + len(false_pos) else 0.0
    recall = tp / (tp + len(false_neg)) if tp + len(false_neg) else 0.0
    report = (
        f"precision {precision:.3f} recall {recall:.3f} over {len(judged)} cases\n"
        f"false alarms ({len(false_pos)}):\n{_wrong(false_pos)}\nmissed ({len(false_neg)}):\n{_wrong(false_neg)}"
    )
    assert (precision, recall) == (1.0, 1.0), report


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def _order_texts(resource: dict[str, Any]) -> str:
    return _squash(" | ".join(text for _, text in read_order(resource).texts))


def _order_codes(resource: dict[str, Any]) -> set[str]:
    return {coding.code for coding in read_order(resource).codings}


@pytest.mark.parametrize("group", GROUPS)
def test_each_flag_names_the_deciding_evidence(group: str) -> None:
    """The card's "why" lines quote what the order really says: the words as written, or the codes it carries."""
    for case in load_group(group):
        if case["label"] != "dsv":
            continue
        resource = case["resource"]
        verdict = judge(read_order(resource), policy())
        assert verdict.flagged, case["id"]
        lines = explain_lines(verdict)
        joined = "\n".join(lines)
        assert lines, case["id"]
        deciding = [e for e in verdict.deciding if e.kind in TECHNIQUES] or [
            e for e in verdict.deciding if e.kind in ("billing-code", "anatomy")
        ]
        assert deciding, (case["id"], describe(verdict))
        texts = _order_texts(resource)
        codes = _order_codes(resource)
        for evidence in deciding:
            assert evidence.label in joined, (case["id"], evidence.label, joined)
            for quoted in re.findall(r"'([^']+)'", evidence.label):
                assert _squash(quoted) in texts, (case["id"], quoted, "is not what the order says")
            for code in re.findall(r"\((?:CPT|SNOMED|ICD-10-CM|LOINC) ([^)]+)\)|^CPT (\d{5})", evidence.label):
                written = next(c for c in code if c)
                assert written in codes, (case["id"], written, "is not a code of the order")
            if evidence.kind in TECHNIQUES:
                assert evidence.place in TECHNIQUE_PLACES, case["id"]
        # A billing code on its own is never the whole story: the spine evidence that made it count is named too.
        if not any(e.kind in TECHNIQUES for e in verdict.deciding):
            assert any(e.kind == "billing-code" for e in deciding), case["id"]
            assert any(e.kind == "anatomy" for e in deciding), (case["id"], joined)


def _associated(card: dict[str, Any]) -> list[str]:
    return [r["reference"] for r in card["extension"]["davinci-crd.associated-resource"]]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_the_app_gives_the_same_verdicts(client: FlaskClient, group: str, hook: str) -> None:
    """Each group's orders in one call: a card for every dsv order and only for those, one each, as judge() says."""
    cases = load_group(group)
    body = hook_request(hook, [case["resource"] for case in cases])
    response = client.post(f"/cds-services/{SELECT if hook == 'order-select' else SIGN}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    cards = response.get_json()["cards"]
    carded = Counter(ref for card in cards for ref in _associated(card))
    assert all(n == 1 for n in carded.values()), carded
    expected = {f"ServiceRequest/{case['id']}" for case in cases if case["label"] == "dsv"}
    judged = {f"ServiceRequest/{case['id']}" for case in cases if judge(read_order(case["resource"]), policy()).flagged}
    assert set(carded) == judged, "the app and judge() disagree"
    assert set(carded) == expected, {"missed": expected - set(carded), "false alarms": set(carded) - expected}
    for card in cards:
        (ref,) = _associated(card)
        verdict = judge(read_order(next(c["resource"] for c in cases if f"ServiceRequest/{c['id']}" == ref)), policy())
        for line in explain_lines(verdict):
            assert line in card["detail"], (ref, line)


def test_order_select_judges_only_the_selected_order(client: FlaskClient) -> None:
    """A dsv order beside others: selecting another order gives no card; selecting it gives one."""
    dsv = next(case["resource"] for _, case in corpus() if case["label"] == "dsv")
    other = next(case["resource"] for _, case in corpus() if case["label"] == "not-dsv")
    for selected, cards in ((other, 0), (dsv, 1)):
        body = hook_request("order-select", [dsv, other], selections=[f"ServiceRequest/{selected['id']}"])
        response = client.post(f"/cds-services/{SELECT}", json=body)
        assert response.status_code == 200
        assert len(response.get_json()["cards"]) == cards


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_other_resource_types_are_not_judged(client: FlaskClient, hook: str) -> None:
    """Only ServiceRequests are orders for imaging: the same words in another resource type raise no card."""
    words = {"text": "Digital motion x-ray of the cervical spine"}
    subject = {"reference": "Patient/pat-1"}
    others = [
        {"resourceType": "Procedure", "id": "p1", "status": "preparation", "code": words, "subject": subject},
        {
            "resourceType": "DeviceRequest",
            "id": "d1",
            "status": "draft",
            "intent": "order",
            "codeCodeableConcept": words,
            "subject": subject,
        },
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "status": "draft",
            "intent": "order",
            "medicationCodeableConcept": words,
            "subject": subject,
        },
    ]
    dsv = next(case["resource"] for _, case in corpus() if case["label"] == "dsv")
    selections = [f"{r['resourceType']}/{r['id']}" for r in [*others, dsv]]
    body = hook_request(hook, [*others, dsv], selections=selections if hook == "order-select" else None)
    response = client.post(f"/cds-services/{SELECT if hook == 'order-select' else SIGN}", json=body)
    assert response.status_code == 200
    assert [_associated(card) for card in response.get_json()["cards"]] == [[f"ServiceRequest/{dsv['id']}"]]


def corpus_summary(path: Path = CORPUS) -> dict[str, dict[str, int]]:
    """Per group: cases, dsv labels, flagged, and true/false positives and negatives (for reports)."""
    out: dict[str, dict[str, int]] = {}
    for group in GROUPS:
        row = Counter[str]()
        for case in load_group(group):
            flagged = judge(read_order(case["resource"]), policy()).flagged
            dsv = case["label"] == "dsv"
            row["cases"] += 1
            row["dsv"] += dsv
            row["tp" if flagged and dsv else "fp" if flagged else "fn" if dsv else "tn"] += 1
        out[group] = dict(row)
    return out
