"""Compile a policy's recognition section (codes, terms, anatomy, look-alikes, ConText) into its term indexes."""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..terms import TermError, TermIndex, fold, term_key
from . import schema as s
from .concepts import compile_concepts
from .model import CodedMeaning, CodeEntry, CodeSet, ContextTrigger, Meaning, Recognition, norm_code
from .schema import CON_KINDS, PRO_KINDS
from .yamlread import Loc, Located, Problem, format_path


@dataclass
class Compiler:
    """Builds the runtime policy from a validated file, collecting every problem instead of stopping at one."""

    source: Path
    located: Located
    problems: list[Problem] = field(default_factory=list)
    # Every term's key -> what it means and where it was written (duplicates and contradictions).
    seen_terms: dict[tuple[bool, str], list[tuple[str, str, Loc]]] = field(default_factory=dict)
    seen_codes: dict[tuple[str, str], list[tuple[str, str, Loc]]] = field(default_factory=dict)
    # Words of the terms by evidence kind (lower case, accents removed; multi-word terms also written together).
    words: dict[str, set[str]] = field(default_factory=dict)
    # Every group name evidence can carry (technique, look-alike, region and billing-code group names).
    groups: set[str] = field(default_factory=set)
    # Every place each kind of evidence can be read in (defaults and the places groups and terms set).
    kind_places: dict[str, set[str]] = field(default_factory=dict)

    def problem(self, path: Loc, message: str) -> None:
        found = Problem(self.source, path, self.located.line_of(path), message)
        if all((p.path, p.message) != (path, message) for p in self.problems):
            self.problems.append(found)

    def fill(self, template: str, allowed: Mapping[str, str], path: Loc, keep: Iterable[str] = ()) -> str:
        """Fill {placeholders} from policy facts at load time; names in `keep` stay for later (per order)."""
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            self.problem(path, f"bad placeholder: {exc} (write a literal brace as {{{{ or }}}})")
            return template
        names = {name for _, name, _, _ in parsed if name is not None}
        shaped = sorted(name for _, name, spec, conversion in parsed if name is not None and (spec or conversion))
        if shaped:
            self.problem(path, f"placeholder(s) {shaped} take no format or conversion: write {{name}}")
            return template
        keep = set(keep)
        unknown = names - set(allowed) - keep
        if unknown:
            self.problem(path, f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(set(allowed) | keep)}")
            return template
        return template.format_map({**allowed, **{k: "{" + k + "}" for k in keep}})

    # -- terms ---------------------------------------------------------------------------------------------------
    def add_terms(
        self,
        index: TermIndex,
        terms: list[s.TermSpec],
        path: Loc,
        meaning: Meaning,
        *,
        kind_places: Mapping[str, frozenset[s.Place]],
        needs_anatomy: bool | None = None,
        track: bool = True,
    ) -> None:
        for i, spec in enumerate(terms):
            where = (*path, i)
            item = meaning
            if spec.needs_anatomy is not None or needs_anatomy is not None:
                if meaning.kind not in ("technique", "ambiguous-technique"):
                    if spec.needs_anatomy is not None:
                        self.problem((*where, "needs_anatomy"), "only a technique's terms can need anatomy")
                else:
                    needs = spec.needs_anatomy if spec.needs_anatomy is not None else bool(needs_anatomy)
                    kind: s.EvidenceKind = "ambiguous-technique" if needs else "technique"
                    item = Meaning(kind, meaning.group, kind_places.get(kind, meaning.places), combo=meaning.combo)
            if spec.places is not None:
                item = Meaning(item.kind, item.group, frozenset(spec.places), item.region, item.combo)
            case = spec.case
            if spec.any_case_with is not None:
                if not spec.case or spec.term is None:
                    self.problem((*where, "any_case_with"), "only a term with `case: true` can also count in any case")
                else:
                    # Matched in any case; the evidence step keeps a match in another case only beside evidence of
                    # these kinds.
                    item = Meaning(
                        item.kind,
                        item.group,
                        item.places,
                        item.region,
                        item.combo,
                        exact_key=term_key(spec.term, case=True),
                        any_case_with=frozenset(spec.any_case_with),
                    )
                    case = False
            try:
                if spec.pattern is not None:
                    index.add_pattern(spec.pattern, item)
                    continue
                if spec.term is None:  # the schema guarantees a term or a pattern
                    continue
                index.add(spec.term, item, case=case)
            except TermError as exc:
                self.problem(where, str(exc))
                continue
            self.add_words(item.kind, spec.term)
            self.groups.add(item.group)
            self.kind_places.setdefault(item.kind, set()).update(item.places)
            if track:
                key = (spec.case, term_key(spec.term, case=spec.case))
                self.seen_terms.setdefault(key, []).append((item.kind, item.group, where))

    def add_words(self, kind: str, term: str) -> None:
        words = [w for w in re.split(r"[^a-z0-9]+", fold(term).lower()) if w]
        bucket = self.words.setdefault(kind, set())
        bucket.update(words)
        if len(words) > 1:
            bucket.add("".join(words))  # "video fluoroscopy" is also written "videofluoroscopy"

    def add_code(self, alias: str, code: str, what: tuple[str, str], path: Loc) -> None:
        self.seen_codes.setdefault((alias, norm_code(code)), []).append((*what, path))

    def check_duplicates(self) -> None:
        for uses in self.seen_terms.values():
            for i, (kind, group, path) in enumerate(uses):
                for other_kind, other_group, other_path in uses[:i]:
                    term = self.term_text(path)
                    first = f"{format_path(other_path)} (line {self.located.line_of(other_path)})"
                    if kind == other_kind and group == other_group:
                        self.problem(path, f"duplicate term {term!r}: already listed at {first}")
                    elif {kind, other_kind} & PRO_KINDS and {kind, other_kind} & CON_KINDS:
                        self.problem(
                            path,
                            f"contradiction: {term!r} is {_describe(kind, group)} here and "
                            f"{_describe(other_kind, other_group)} at {first}",
                        )
                    elif kind == other_kind:
                        self.problem(
                            path, f"duplicate term {term!r}: already {_describe(other_kind, other_group)} at {first}"
                        )
        for (alias, code), uses in self.seen_codes.items():
            for i, (kind, group, path) in enumerate(uses):
                for other_kind, other_group, other_path in uses[:i]:
                    if kind == other_kind and group == other_group:
                        self.problem(
                            path, f"duplicate code {alias} {code}: already listed at {format_path(other_path)}"
                        )
                    elif {kind, other_kind} & PRO_KINDS and {kind, other_kind} & CON_KINDS:
                        self.problem(
                            path,
                            f"contradiction: {alias} {code} is {_describe(kind, group)} here and "
                            f"{_describe(other_kind, other_group)} at {format_path(other_path)}",
                        )
        _written_again_with_attributes(self)

    def term_text(self, path: Loc) -> str:
        node: Any = self.located.data
        for part in path:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return "?"
        if isinstance(node, dict):
            return str(node.get("term") or node.get("pattern"))
        return str(node)


def _written_again_with_attributes(c: Compiler) -> None:
    """A term listed twice in one group, once plain and once as a mapping whose attributes change its kind or case
    (`{term: cine, needs_anatomy: false}`, `{term: CINE, case: true}` beside `cine`): the plain term already matches
    every case, so the second listing is a duplicate whose attributes never had the effect the analyst meant."""
    by_word: dict[str, list[tuple[tuple[bool, str], str, str, Loc]]] = {}
    for key, uses in c.seen_terms.items():
        for kind, group, path in uses:
            by_word.setdefault(term_key(c.term_text(path), case=False), []).append((key, kind, group, path))
    for listed in by_word.values():
        for i, (key, kind, group, path) in enumerate(listed):
            for other_key, other_kind, other_group, other_path in listed[:i]:
                if group != other_group or _family(kind) != _family(other_kind):
                    continue
                if key == other_key and kind == other_kind:
                    continue  # check_duplicates reports it
                if key[0] and other_key[0]:
                    continue  # two case-sensitive spellings ("DMX", "Dmx") are two terms
                first, second = sorted(
                    [(other_path, other_key), (path, key)], key=lambda u: c.located.line_of(u[0]) or 0
                )
                c.problem(
                    second[0],
                    f"duplicate term {c.term_text(second[0])!r}: already listed at {format_path(first[0])} "
                    f"(line {c.located.line_of(first[0])}) as {c.term_text(first[0])!r}; one listing with the "
                    "attributes it needs is enough",
                )


def _family(kind: str) -> str:
    return "technique" if kind in ("technique", "ambiguous-technique") else kind


def _describe(kind: str, group: str) -> str:
    return f"a {kind} ({group})" if group else f"a {kind}"


def _places(spec: s.Recognition) -> dict[str, frozenset[s.Place]]:
    return {kind: frozenset(places) for kind, places in spec.places.items()}


def compile_recognition(c: Compiler, spec: s.Recognition, base: Loc) -> Recognition:
    """The recognition section compiled, one YAML section after another (the order fixes the order of problems)."""
    return _RecognitionCompiler(c, spec, base).compile()


class _RecognitionCompiler:
    """One recognition section: its indexes and codes, filled section by section, every problem kept in `c`."""

    def __init__(self, c: Compiler, spec: s.Recognition, base: Loc) -> None:
        self.c = c
        self.spec = spec
        self.base = base
        self.places = _places(spec)
        self.systems = spec.code_systems
        self.index = TermIndex()
        self.exact: dict[tuple[str, str], list[CodedMeaning]] = {}
        self.code_sets: list[CodeEntry] = []
        self.ranged: list[tuple[str, CodeSet, CodedMeaning, Loc]] = []
        self.technique_meanings: dict[str, Meaning] = {}

    def compile(self) -> Recognition:
        c, spec = self.c, self.spec
        self.billing_codes()
        self.techniques()
        self.anatomy()
        self.other_anatomy()
        self.look_alikes()
        # Concept classes and the techniques composed of them (concepts.py).
        compositions = compile_concepts(c, spec, self.index, self.technique_meanings, self.places, self.base)
        context = self.context()
        answers = self.answers()
        typo_words = self.typo_words()
        known = self.known_words()
        self.contradictions()
        c.check_duplicates()
        try:
            self.index.compile()
            context.compile()
        except TermError as exc:
            c.problem(self.base, str(exc))
        anatomy = spec.anatomy
        return Recognition(
            compositions=compositions,
            system_alias={uri: alias for alias, uris in self.systems.items() for uri in uris},
            canonical_system={alias: uris[0] for alias, uris in self.systems.items()},
            order_fields=frozenset(spec.order_fields),
            exact_codes=self.exact,
            code_sets=self.code_sets,
            index=self.index,
            anatomy=anatomy.name,
            regions=tuple(anatomy.regions),
            context=context,
            context_kinds=frozenset(spec.context_kinds),
            yes_answers=frozenset(answers["yes"]),
            no_answers=frozenset(answers["no"]),
            typo_words=tuple(sorted(typo_words)),
            known_words=frozenset(known),
            typo_min_length=spec.typos.min_length if spec.typos else 8,
            abbreviations=dict(spec.abbreviations),
            typo_max_edits=spec.typos.max_edits if spec.typos else 1,
            typo_long_length=spec.typos.two_edits_from or 99 if spec.typos else 99,
            typo_max_edits_long=2 if spec.typos and spec.typos.two_edits_from else 1,
        )

    def kind_places(self, kind: s.EvidenceKind, own: list[s.Place] | None, path: Loc) -> frozenset[s.Place]:
        if own is not None:
            return frozenset(own)
        if kind not in self.places:
            self.c.problem((*self.base, "places"), f"no places for {kind!r} evidence: add `{kind}: [...]` under places")
            return frozenset()
        return self.places[kind]

    def check_alias(self, alias: str, path: Loc) -> bool:
        if alias not in self.systems:
            close = difflib.get_close_matches(alias, list(self.systems), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; declared: {', '.join(self.systems)}"
            self.c.problem(path, f"code system {alias!r} is not declared in recognition.code_systems{hint}")
            return False
        return True

    def add_codes(self, alias: str, specs: list[str], meaning: CodedMeaning, path: Loc, *, prefixes: bool) -> None:
        c = self.c
        if not self.check_alias(alias, path):
            return
        try:
            codes = CodeSet(specs, prefixes=prefixes)
        except ValueError as exc:
            c.problem(path, str(exc))
            return
        c.groups.add(meaning.group)
        c.kind_places.setdefault(meaning.kind, set()).update(meaning.places)
        for code in codes.exact:
            self.exact.setdefault((alias, code), []).append(meaning)
            c.add_code(alias, code, (meaning.kind, meaning.group), path)
        if codes.ranges or codes.prefixes:
            self.code_sets.append(CodeEntry(alias, codes, meaning))
            self.ranged.append((alias, codes, meaning, path))

    def billing_codes(self) -> None:
        base = self.base
        billing_places = self.kind_places("billing-code", None, base)
        for alias, codes in self.spec.billing_codes.items():
            for code, entry in codes.items():
                display = entry if isinstance(entry, str) else entry.display
                group = "billing code" if isinstance(entry, str) else entry.group or "billing code"
                meaning = CodedMeaning("billing-code", group, display, billing_places)
                self.add_codes(alias, [code], meaning, (*base, "billing_codes", alias, code), prefixes=False)

    def techniques(self) -> None:
        c, index, places = self.c, self.index, self.places
        names: set[str] = set()
        for t, technique in enumerate(self.spec.techniques):
            tpath = (*self.base, "techniques", t)
            if technique.name in names:
                c.problem((*tpath, "name"), f"technique {technique.name!r} is listed twice")
            names.add(technique.name)
            kind: s.EvidenceKind = "ambiguous-technique" if technique.needs_anatomy else "technique"
            named = Meaning(kind, technique.name, self.kind_places(kind, technique.places, tpath))
            self.technique_meanings[technique.name] = named
            c.add_terms(
                index,
                technique.terms,
                (*tpath, "terms"),
                named,
                kind_places=places,
                needs_anatomy=technique.needs_anatomy,
            )
            for k, combination in enumerate(technique.combinations):
                combo_id = f"{technique.name}#{k}"
                for g, words in enumerate(combination):
                    part = Meaning(kind, technique.name, named.places, combo=(combo_id, g, len(combination)))
                    c.add_terms(
                        index,
                        words,
                        (*tpath, "combinations", k, g),
                        part,
                        kind_places=places,
                        needs_anatomy=technique.needs_anatomy,
                        track=False,
                    )

    def anatomy(self) -> None:
        """The policy's anatomy, by region: body-site codes, words, and the diagnoses that name the region."""
        c, anatomy = self.c, self.spec.anatomy
        apath = (*self.base, "anatomy")
        anatomy_places = self.kind_places("anatomy", None, apath)
        for region, rspec in anatomy.regions.items():
            rpath = (*apath, "regions", region)
            for alias, sites in rspec.codes.items():
                for code, site in sites.items():
                    meaning = CodedMeaning("anatomy", region, site, anatomy_places, region=region)
                    self.add_codes(alias, [code], meaning, (*rpath, "codes", alias, code), prefixes=False)
            c.add_terms(
                self.index,
                rspec.terms,
                (*rpath, "terms"),
                Meaning("anatomy", region, anatomy_places, region=region),
                kind_places=self.places,
            )
        for alias, entries in anatomy.diagnoses.items():
            for d, dx in enumerate(entries):
                dpath = (*apath, "diagnoses", alias, d)
                if dx.region is not None and dx.region not in anatomy.regions:
                    c.problem((*dpath, "region"), f"region {dx.region!r} is not one of anatomy.regions")
                specs = [part.strip() for part in dx.codes.split(",") if part.strip()]
                # The most specific entry names a code covered by several (M54.2 within M40-M54).
                specificity = 0 if any("-" in p and len(p.split("-")[0]) == len(p.split("-")[1]) for p in specs) else 1
                specificity *= len(norm_code(dx.codes))
                meaning = CodedMeaning(
                    "anatomy", dx.region or anatomy.name, dx.display, anatomy_places, dx.region or "", specificity
                )
                # ICD-10-CM codes extend their category ("M54.5" covers M54.50, M54.51 ...): prefixes.
                self.add_codes(alias, specs, meaning, (*dpath, "codes"), prefixes=alias.startswith("icd10"))

    def other_anatomy(self) -> None:
        base = self.base
        other_places = self.kind_places("other-anatomy", None, (*base, "other_anatomy"))
        self.c.add_terms(
            self.index,
            self.spec.other_anatomy.terms,
            (*base, "other_anatomy", "terms"),
            Meaning("other-anatomy", "", other_places),
            kind_places=self.places,
        )

    def look_alikes(self) -> None:
        c = self.c
        look_names: set[str] = set()
        for i, look in enumerate(self.spec.look_alikes):
            lpath = (*self.base, "look_alikes", i)
            if look.name in look_names:
                c.problem((*lpath, "name"), f"look-alike {look.name!r} is listed twice")
            look_names.add(look.name)
            if not look.terms and not look.codes:
                c.problem(lpath, "a look-alike needs codes or terms")
            lplaces = self.kind_places(look.kind, look.places, lpath)
            for alias, listed in look.codes.items():
                look_code = CodedMeaning(look.kind, look.name, look.name, lplaces)
                self.add_codes(alias, [str(x) for x in listed], look_code, (*lpath, "codes", alias), prefixes=False)
            c.add_terms(
                self.index,
                look.terms,
                (*lpath, "terms"),
                Meaning(look.kind, look.name, lplaces),
                kind_places=self.places,
            )

    def context(self) -> TermIndex:
        """ConText triggers and terminators: their own index, never evidence."""
        c, spec, base = self.c, self.spec, self.base
        context = TermIndex()
        for i, trigger in enumerate(spec.context):
            ref = ContextTrigger(trigger.name, trigger.assertion, trigger.direction, trigger.window)
            for t, term in enumerate(trigger.terms):
                add_plain(c, context, term, ref, (*base, "context", i, "terms", t))
        for t, term in enumerate(spec.terminators):
            add_plain(c, context, term, "terminate", (*base, "terminators", t))
        return context

    def answers(self) -> dict[str, set[str]]:
        c, spec, base = self.c, self.spec, self.base
        answers: dict[str, set[str]] = {"yes": set(), "no": set()}
        if spec.questions is not None:
            for answer in ("yes", "no"):
                for t, term in enumerate(getattr(spec.questions, answer)):
                    if term.term is None:
                        c.problem((*base, "questions", answer, t), "an answer is a word or phrase, not a pattern")
                        continue
                    answers[answer].add(term_key(term.term, case=False))
            for both in sorted(answers["yes"] & answers["no"]):
                c.problem((*base, "questions"), f"{both!r} is listed as both a yes and a no answer")
        return answers

    def typo_words(self) -> set[str]:
        c, spec = self.c, self.spec
        typo_words: set[str] = set()
        if spec.typos is not None:
            for k, kind in enumerate(spec.typos.kinds):
                if kind not in s.GUESS_KINDS:
                    c.problem(
                        (*self.base, "typos", "kinds", k),
                        "a typo may only be read as a word of what the order names "
                        f"({', '.join(sorted(s.GUESS_KINDS))}):"
                        f" read as {kind} evidence, a guess would argue against the order",
                    )
                    continue
                typo_words |= {w for w in c.words.get(kind, ()) if len(w) >= spec.typos.min_length and w.isalpha()}
        return typo_words

    def known_words(self) -> set[str]:
        c = self.c
        known: set[str] = set().union(*c.words.values()) if c.words else set()
        for trigger in self.spec.context:
            for term in trigger.terms:
                if term.term is not None:
                    known.update(w for w in re.split(r"[^a-z0-9]+", fold(term.term).lower()) if w)
        return known

    def contradictions(self) -> None:
        """A code listed exactly under one meaning and inside a range or prefix of a contradicting one ("78305" beside
        a look-alike's "78300-78320") is a contradiction like two exact codes."""
        for alias, covered, meaning, path in self.ranged:
            for (code_alias, code), meanings in self.exact.items():
                if code_alias != alias or code in covered.exact or code not in covered:
                    continue
                for other in meanings:
                    if {meaning.kind, other.kind} & PRO_KINDS and {meaning.kind, other.kind} & CON_KINDS:
                        self.c.problem(
                            path,
                            f"contradiction: {alias} {code} is {_describe(other.kind, other.group)} and inside this "
                            f"range of {_describe(meaning.kind, meaning.group)}",
                        )


def add_plain(c: Compiler, index: TermIndex, spec: s.TermSpec, ref: Any, path: Loc) -> None:
    try:
        if spec.pattern is not None:
            index.add_pattern(spec.pattern, ref)
        elif spec.term is not None:
            index.add(spec.term, ref, case=spec.case)
    except TermError as exc:
        c.problem(path, str(exc))
