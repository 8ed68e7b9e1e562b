"""The cheap first pass is exact: an order it lets skip the full judgement gets the rule the full judgement names."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest

from cds_service.engine import judge, load_policies, read_order
from cds_service.engine.policy.compile_decision import needed_text
from cds_service.engine.policy.model import Policy

from .conftest import ROOT

SHARED = ROOT.parent / "shared" / "corpora"


@cache
def shipped() -> Policy:
    [policy] = load_policies().policies
    return policy


def labelled_orders() -> list[dict[str, Any]]:
    files = [*(ROOT / "policies" / "examples").glob("*.json"), *(ROOT / "fixtures").glob("corpus-heldout*/*.json")]
    out = [case["resource"] for path in files for case in json.loads(path.read_text(encoding="utf-8"))]
    outside = [json.loads(p.read_text(encoding="utf-8"))["resource"] for p in SHARED.glob("outside-[12]/*.json")]
    assert len(outside) == 251  # the two outside corpora (../shared/corpora), read as their own sets elsewhere
    return out + outside


@pytest.mark.parametrize(
    ("pattern", "needs"),
    [
        (r"\bFL\b(?!\s*\d{5})", ("fl", True)),
        (r"(?<!, )\bMR\b", ("mr", True)),
        (r"(?i)\bkine(?:tic|matic)\s+sequences\b", ("sequences", True)),
        (r"(?i)\bflexion\s*extension\s+sequences\b", ("sequences", True)),  # \s* may be empty: not a word's edge
        (r"(?i)\bdynamic\s*mri", ("dynamic", False)),  # followed by \s*: maybe "dynamicmri"
        (r"(?i)DMX", ("dmx", False)),
        (r"cine|video", (None, False)),  # an alternation at the top: nothing every match holds
        (r"\bx\b", (None, False)),  # one character is not worth a test
    ],
)
def test_what_every_match_of_a_pattern_holds(pattern: str, needs: tuple[str | None, bool]) -> None:
    compiled = re.compile(pattern)
    assert needed_text(compiled) == needs
    text, _whole_word = needs
    for sample in ("FL spine", "fl", "an MR study", "Kinetic sequences", "dmx c-spine", "video", "x"):
        if compiled.search(sample):
            assert text is None or text in sample.lower()


def test_the_first_pass_names_the_rule_the_full_judgement_names(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = shipped()
    orders = labelled_orders()
    assert len(orders) > 3000
    quick = [judge(read_order(resource), policy) for resource in orders]
    skipped = sum("places" not in v.order.__dict__ for v in quick)
    monkeypatch.setattr(policy.recognition, "prefilter", False)
    full = [judge(read_order(resource), policy) for resource in orders]
    # Labelled orders are nearly all imaging that names the policy's words: the few it decides alone, and the rules of
    # every other one, must be the full judgement's.
    assert skipped >= 2
    wrong = [
        (q.order.id, q.rule, f.rule)
        for q, f in zip(quick, full, strict=True)
        if (q.rule, q.flagged) != (f.rule, f.flagged)
    ]
    assert wrong == []
