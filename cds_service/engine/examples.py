"""Labelled examples beside a policy: judge each one and say which the policy gets wrong, and why."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .decision import Verdict, judge
from .errors import InvalidRequest
from .orders import read_order
from .policy.model import PolicySet
from .policy.yamlread import Problem
from .tolerant import well_formed

# The corpus format's labels ("dsv" is the shipped policy's positive), and the general spelling for other policies.
POSITIVE = frozenset({"dsv", "flagged"})
NEGATIVE = frozenset({"not-dsv", "not-flagged"})
_KEYS = {"id", "label", "why", "resource"}
_OPTIONAL = {"policy", "rule"}


@dataclass(frozen=True)
class Example:
    id: str
    label: str
    why: str
    resource: dict[str, Any]
    source: Path
    policy: str | None = None
    rule: str | None = None

    @property
    def positive(self) -> bool:
        return self.label in POSITIVE


@dataclass
class Judged:
    example: Example
    verdicts: list[Verdict]

    @property
    def flagged(self) -> bool:
        return any(v.flagged for v in self.verdicts)

    @property
    def correct(self) -> bool:
        if self.flagged != self.example.positive:
            return False
        if self.example.rule is not None:
            return any(v.rule == self.example.rule for v in self.verdicts)
        return True


@dataclass
class ExampleReport:
    judged: list[Judged] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def count(self, flagged: bool, positive: bool) -> int:
        return sum(1 for j in self.judged if j.flagged is flagged and j.example.positive is positive)

    @property
    def precision(self) -> float:
        tp, fp = self.count(True, True), self.count(True, False)
        return tp / (tp + fp) if tp + fp else 1.0

    @property
    def recall(self) -> float:
        tp, fn = self.count(True, True), self.count(False, True)
        return tp / (tp + fn) if tp + fn else 1.0

    @property
    def misjudged(self) -> list[Judged]:
        return [j for j in self.judged if not j.correct]


def load_examples(folder: Path, policies: PolicySet) -> tuple[list[Example], list[Problem]]:
    """Every example in `folder/*.json`; a malformed record or an unknown policy or rule id is a problem."""
    examples: list[Example] = []
    problems: list[Problem] = []
    ids: dict[str, Path] = {}
    rules = {p.id: {r.id for r in p.rules} for p in policies.policies}
    for path in sorted(folder.glob("*.json")):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(Problem(path, (), getattr(exc, "lineno", None), f"cannot read the examples: {exc}"))
            continue
        if not isinstance(records, list):
            problems.append(Problem(path, (), 1, "an examples file holds a JSON array of examples"))
            continue
        for i, record in enumerate(records):
            where: tuple[str | int, ...] = (i,)
            if not isinstance(record, dict) or not _KEYS <= set(record) <= _KEYS | _OPTIONAL:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                problems.append(
                    Problem(
                        path, where, None, f"an example has {sorted(_KEYS)} (and optionally policy, rule); got {keys}"
                    )
                )
                continue
            label = record["label"]
            if label not in POSITIVE | NEGATIVE:
                problems.append(
                    Problem(
                        path, (*where, "label"), None, f"label {label!r}: use dsv / not-dsv (or flagged / not-flagged)"
                    )
                )
                continue
            eid = str(record["id"])
            if eid in ids:
                problems.append(Problem(path, (*where, "id"), None, f"example id {eid!r} is also used in {ids[eid]}"))
            ids[eid] = path
            policy = record.get("policy")
            if policy is not None and policy not in rules:
                problems.append(Problem(path, (*where, "policy"), None, f"no policy {policy!r} in this folder"))
                continue
            rule = record.get("rule")
            known = rules[policy] if policy else set().union(*rules.values())
            if rule is not None and rule not in known:
                problems.append(Problem(path, (*where, "rule"), None, f"no rule {rule!r} in the decision table"))
                continue
            resource = record["resource"]
            if not isinstance(resource, dict) or resource.get("resourceType") != "ServiceRequest":
                problems.append(Problem(path, (*where, "resource"), None, "the resource must be a ServiceRequest"))
                continue
            try:
                well_formed(resource, "resource")  # what a live call would refuse with a 400
            except InvalidRequest as exc:
                problems.append(Problem(path, (*where, "resource"), None, f"a live call would refuse it: {exc}"))
                continue
            examples.append(Example(eid, label, str(record["why"]), resource, path, policy, rule))
    return examples, problems


def judge_examples(examples: list[Example], policies: PolicySet) -> list[Judged]:
    out = []
    for example in examples:
        # The path of a live call: the tolerant reader's fixed copy, parsed once, judged by each policy.
        order = read_order(well_formed(example.resource, "resource"), example.resource)
        chosen = [p for p in policies.policies if example.policy in (None, p.id)]
        out.append(Judged(example, [judge(order, p) for p in chosen]))
    return out


def run_examples(policies: PolicySet, folder: Path) -> ExampleReport:
    examples, problems = load_examples(folder, policies)
    return ExampleReport(judge_examples(examples, policies), problems)
