"""Compile a policy's decision table (conditions, rules) and the prefilter that lets most orders skip judging."""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Mapping
from typing import Any

from ..terms import fold
from . import schema as s
from .compile_recognition import Compiler
from .model import CandidatePattern, Cond, EvidenceTest, FactTest, Group, Recognition, Rule
from .yamlread import Loc

_FACT_NAMES = ("status", "intent")


def _condition(
    c: Compiler,
    spec: s.Condition,
    path: Loc,
    named: Mapping[str, s.Condition],
    resolving: tuple[str, ...] = (),
    rules: Mapping[str, tuple[int, s.Rule]] | None = None,
) -> Cond:
    if spec.evidence is not None:
        never = sorted(set(spec.in_ or ()) - c.kind_places.get(spec.evidence, set()))
        if never:
            c.problem(
                (*path, "in"),
                f"{spec.evidence} evidence is never read in {never} (see recognition.places and the places of its "
                "terms), so this test can never hold there",
            )
        for g, group in enumerate(spec.group or []):
            if group not in c.groups:
                close = difflib.get_close_matches(group, sorted(c.groups), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                c.problem((*path, "group", g), f"no technique, look-alike, region or code group named {group!r}{hint}")
        return EvidenceTest(
            spec.evidence,
            frozenset(spec.in_) if spec.in_ is not None else None,
            frozenset(spec.assertion or s.ASSERTED),
            frozenset(spec.group) if spec.group is not None else None,
        )
    for fact in _FACT_NAMES:
        values = getattr(spec, fact)
        if values is not None:
            return FactTest(fact, frozenset(values))
    if spec.do_not_perform is not None:
        return FactTest("do_not_perform", frozenset({str(spec.do_not_perform).lower()}))
    if spec.condition is not None:
        name = spec.condition
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            c.problem((*path, "condition"), f"no condition named {name!r} under `conditions:`{hint}")
            return Group()
        if name in resolving:
            c.problem((*path, "condition"), f"condition {name!r} refers to itself ({' -> '.join((*resolving, name))})")
            return Group()
        return _condition(c, named[name], ("conditions", name), named, (*resolving, name), rules)
    if spec.rule is not None:
        rules = rules or {}
        found = rules.get(spec.rule)
        if found is None:
            close = difflib.get_close_matches(spec.rule, list(rules), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            c.problem((*path, "rule"), f"no rule with id {spec.rule!r} in `decision:`{hint}")
            return Group()
        index, rule = found
        key = f"rule {spec.rule}"
        if key in resolving:
            c.problem((*path, "rule"), f"rule {spec.rule!r} refers to itself ({' -> '.join((*resolving, key))})")
            return Group()
        if rule.when is None:
            return Group()  # the default rule always holds
        return _condition(c, rule.when, ("decision", index, "when"), named, (*resolving, key), rules)
    return Group(
        all=tuple(_condition(c, x, (*path, "all", i), named, resolving, rules) for i, x in enumerate(spec.all or [])),
        any=tuple(_condition(c, x, (*path, "any", i), named, resolving, rules) for i, x in enumerate(spec.any or [])),
        unless=tuple(
            _condition(c, x, (*path, "unless", i), named, resolving, rules) for i, x in enumerate(spec.unless or [])
        ),
    )


def compile_rules(c: Compiler, spec: s.PolicyFile) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    ids: dict[str, int] = {}
    by_id = {rule.id: (i, rule) for i, rule in reversed(list(enumerate(spec.decision)))}
    allowed = {name: "{" + name + "}" for name in (*_FACT_NAMES, "deciding", *s.EVIDENCE_KINDS)}
    for i, rule in enumerate(spec.decision):
        path: Loc = ("decision", i)
        if rule.id in ids:
            c.problem((*path, "id"), f"rule id {rule.id!r} is already used by decision[{ids[rule.id]}]")
        ids.setdefault(rule.id, i)
        when = (
            _condition(c, rule.when, (*path, "when"), spec.conditions, (f"rule {rule.id}",), by_id)
            if rule.when is not None
            else None
        )
        if when is None and i != len(spec.decision) - 1:
            c.problem(path, f"rule {rule.id!r} has no `when:`, so it always holds and the rules after it never apply")
        reason = c.fill(rule.reason, {}, (*path, "reason"), keep=allowed)
        if rule.review and rule.verdict == "flagged":
            c.problem(
                (*path, "review"), "review: true marks a not-flagged rule whose orders may be misses; this one flags"
            )
        rules.append(Rule(rule.id, when, rule.verdict, reason, review=rule.review))
    if spec.decision and spec.decision[-1].when is not None:
        c.problem(
            ("decision", len(spec.decision) - 1),
            "the last rule must have no `when:` (it decides every order no other rule decided)",
        )
    for name in spec.conditions:
        _condition(c, spec.conditions[name], ("conditions", name), spec.conditions, (name,), by_id)
    return tuple(rules)


def _needs(cond: Cond | None) -> frozenset[str] | None:
    """Kinds of evidence of which at least one must be present for the condition to hold (None: no such kinds)."""
    if cond is None or isinstance(cond, FactTest):
        return None
    if isinstance(cond, EvidenceTest):
        return frozenset({cond.kind})
    known = [n for n in (_needs(c) for c in cond.all) if n is not None]
    if known:
        return min(known, key=len)
    if cond.any:
        each = [_needs(c) for c in cond.any]
        if all(n is not None for n in each):
            return frozenset().union(*(n for n in each if n is not None))
    return None


def _kinds_in(cond: Cond | None) -> frozenset[str]:
    """Every kind of evidence a condition tests anywhere (in all, any or unless)."""
    if isinstance(cond, EvidenceTest):
        return frozenset({cond.kind})
    if isinstance(cond, Group):
        return frozenset().union(*(_kinds_in(c) for c in (*cond.all, *cond.any, *cond.unless)))
    return frozenset()


# The interpreter's own regex parser (private, untyped; CPython 3.11+ names it re._parser).
_re_parser: Any = importlib.import_module("re._parser")


def needed_text(pattern: re.Pattern[str]) -> tuple[str | None, bool]:
    """A run of plain characters (two or more) at the pattern's top level, lower-cased, which every match holds (in
    some case), and whether it is a whole word of the order (word boundaries or whitespace on both sides): whole words
    first, then the longest. (None, False) when there is none or the pattern cannot be read (then it is always
    searched).

    Read with the interpreter's own regex parser (re._parser, CPython 3.11+): the top-level sequence of a parsed
    pattern lists what every match goes through; a LITERAL there is one character every match contains."""
    try:
        items = list(_re_parser.parse(pattern.pattern, pattern.flags))
    except Exception:  # a private module: if it ever changes, every pattern is searched as before
        return None, False
    best: tuple[bool, int, str] = (False, 0, "")
    start = 0
    while start < len(items):
        end = start
        while end < len(items) and items[end][0] is _re_parser.LITERAL:
            end += 1
        if end - start >= 2:
            run = "".join(chr(value) for _, value in items[start:end])
            whole = run.isalnum() and _word_edge(items, start - 1) and _word_edge(items, end)
            best = max(best, (whole, len(run), run))
        start = end + 1
    return (best[2].lower(), best[0]) if best[2] else (None, False)


def _word_edge(items: list[tuple[Any, Any]], at: int) -> bool:
    """Whether what the pattern has at `at` ends a word: \\b, or at least one whitespace character."""
    if not 0 <= at < len(items):
        return False
    op, value = items[at]
    if (op, value) == (_re_parser.AT, _re_parser.AT_BOUNDARY):
        return True
    space = [(_re_parser.IN, [(_re_parser.CATEGORY, _re_parser.CATEGORY_SPACE)])]
    return op is _re_parser.MAX_REPEAT and value[0] >= 1 and list(value[2]) == space


def prefilter(spec: s.Recognition, rules: tuple[Rule, ...], rec: Recognition) -> None:
    """The words and codes without which no rule that tests evidence can hold: the cheap pass that lets most orders
    (labs, medications, imaging of other kinds) skip the full judgement. An order it skips has no evidence, so the
    rule that decides it (by its request facts) is the one the full judgement would name: the audit and the
    possible-misses review see the true rule."""
    needed = _needed_kinds(rules)
    if needed is None:
        return  # a flagging rule that needs no evidence: every order is judged in full
    found = _Candidates()
    found.techniques(spec, needed)
    found.others(spec, needed)
    for (_alias, code), meanings in rec.exact_codes.items():
        if any(m.kind in needed for m in meanings):
            found.tokens.add(code.lower())
    # Ranges and prefixes cannot be listed as words: the first pass tests the order's code values against them.
    rec.candidate_code_sets = tuple(entry.codes for entry in rec.code_sets if entry.meaning.kind in needed)
    rec.candidate_tokens = frozenset(found.tokens)
    rec.candidate_patterns = tuple(CandidatePattern(p, *needed_text(p)) for p in found.patterns)
    anatomy: set[str] = set()
    for region in spec.anatomy.regions.values():
        for term in region.terms:
            if term.term is not None:
                anatomy.update(w for w in re.split(r"[^a-z0-9]+", fold(term.term).lower()) if w)
    rec.anatomy_tokens = frozenset(anatomy)
    rec.prefilter = True


def _needed_kinds(rules: tuple[Rule, ...]) -> set[str] | None:
    """The kinds of evidence of which one must be there for a rule to decide; None when a flagging rule needs none."""
    needed: set[str] = set()
    for rule in rules:
        if not rule.flags:
            # Evidence of one of these kinds must be there for the rule to hold (a rule that could hold without
            # evidence but tests some: any kind it tests could make it the deciding one).
            needed |= _needs(rule.when) or _kinds_in(rule.when)
            continue
        kinds = _needs(rule.when)
        if kinds is None:
            return None
        needed |= kinds
    return needed


class _Candidates:
    """The first words and patterns of the terms that give the needed kinds of evidence."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []

    @staticmethod
    def first_words(term: s.TermSpec) -> set[str]:
        words = [w for w in re.split(r"[^a-z0-9]+", fold(term.term or "").lower()) if w]
        # Separators between a term's words are optional, so its first word in a text is any run of its first
        # words written together ("video fluoroscopy" as "videofluoroscopy"); a plural may end the last.
        out = {"".join(words[:k]) for k in range(1, len(words) + 1)}
        joined = "".join(words)
        return out | {joined + "s", joined + "es"}

    def add(self, term: s.TermSpec) -> None:
        if term.pattern is not None:
            if term.pattern not in {p.pattern for p in self.patterns}:
                self.patterns.append(re.compile(term.pattern))
        elif term.term is not None:
            self.tokens.update(self.first_words(term))

    def rarest(self, groups: list[list[s.TermSpec]]) -> list[s.TermSpec]:
        """A combination holds only when every group of its words is there, so one group's words are enough to
        find its candidates: the group written without patterns whose shortest word is longest (the rarest)."""
        plain = [g for g in groups if all(t.pattern is None for t in g)] or groups
        return max(plain, key=lambda g: min((len(w) for t in g for w in self.first_words(t)), default=0))

    def techniques(self, spec: s.Recognition, needed: set[str]) -> None:
        for technique in spec.techniques:
            for term in technique.terms:
                kind = (
                    "ambiguous-technique"
                    if (term.needs_anatomy if term.needs_anatomy is not None else technique.needs_anatomy)
                    else "technique"
                )
                if kind in needed:
                    self.add(term)
            if needed & {"technique", "ambiguous-technique"}:
                for combination in technique.combinations:
                    for term in self.rarest(combination):
                        self.add(term)
        if needed & {"technique", "ambiguous-technique"}:
            # A composition holds only with a concept of every slot: one slot's words find its candidates.
            for comp in spec.compositions:
                slots = [
                    [
                        t
                        for name in ([e] if isinstance(e, str) else e)
                        if name in spec.concepts
                        for t in spec.concepts[name].terms
                    ]
                    for e in comp.all
                ]
                for term in self.rarest(slots):
                    self.add(term)

    def others(self, spec: s.Recognition, needed: set[str]) -> None:
        for look in spec.look_alikes:
            if look.kind in needed:
                for term in look.terms:
                    self.add(term)
        if "anatomy" in needed:
            for region in spec.anatomy.regions.values():
                for term in region.terms:
                    self.add(term)
        if "other-anatomy" in needed:
            for term in spec.other_anatomy.terms:
                self.add(term)
