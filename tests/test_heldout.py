"""Held-out labelled orders (fixtures/corpus-heldout*/), written apart from the engine: the scores an outside check
of unseen orders should expect. Reported on every run; a drop below the floor fails."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from cds_service.engine import PolicySet, describe, judge, load_policies, read_order

from .conftest import ROOT

SETS = sorted(p for p in (ROOT / "fixtures").glob("corpus-heldout*") if p.is_dir())
# The outside target is 0.99 on both; a held-out set that has never been tuned on may sit a little below it.
FLOOR = 0.97
# Sets scored below the floor today, each held at its current score so any drop fails (docs/policy-analysts.md has
# every set's first-scored and current numbers).
FLOORS: dict[str, float] = {}


@cache
def policy_set() -> PolicySet:
    return load_policies()


def test_there_is_a_held_out_set_of_realistic_size() -> None:
    assert SETS
    for folder in SETS:
        cases = [c for f in folder.glob("*.json") for c in json.loads(f.read_text(encoding="utf-8"))]
        assert len(cases) >= 150, folder
        assert {c["label"] for c in cases} == {"dsv", "not-dsv"}


@pytest.mark.parametrize("folder", SETS, ids=[p.name for p in SETS])
def test_held_out_precision_and_recall(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    [policy] = policy_set().policies
    tp = fp = fn = tn = 0
    wrong: list[str] = []
    for path in sorted(folder.glob("*.json")):
        for case in json.loads(path.read_text(encoding="utf-8")):
            verdict = judge(read_order(case["resource"]), policy)
            positive = case["label"] == "dsv"
            tp += verdict.flagged and positive
            fp += verdict.flagged and not positive
            fn += positive and not verdict.flagged
            tn += not positive and not verdict.flagged
            if verdict.flagged != positive:
                wrong.append(f"{case['id']} ({case['why']}):\n{describe(verdict)}")
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    with capsys.disabled():
        print(f"\n{folder.name}: precision {precision:.3f} recall {recall:.3f} ({tp} tp, {fp} fp, {fn} fn, {tn} tn)")  # noqa: T201
    floor = FLOORS.get(folder.name, FLOOR)
    assert precision >= floor and recall >= floor, "\n".join(wrong)
