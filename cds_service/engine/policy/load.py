"""Load policy files: validate strictly, report every problem with file, path and line, compile what judging needs."""

from __future__ import annotations

import copy
import difflib
import hashlib
import re
import string
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..markdown import MAX_DETAIL_WORDS, word_count
from ..terms import TermError, TermIndex, fold, term_key
from . import schema as s
from .concepts import compile_concepts
from .language import (
    DEFAULT_LANGUAGES,
    LANGUAGES_DIR,
    Language,
    LanguageFile,
    language_files,
    language_path,
    merged_recognition,
)
from .model import (
    COVERED_BY_STATUS,
    Alternative,
    CardText,
    CodedMeaning,
    CodeEntry,
    CodeSet,
    Coding,
    Cond,
    ContextTrigger,
    EvidenceTest,
    FactTest,
    Group,
    Link,
    Meaning,
    Policy,
    PolicyError,
    PolicySet,
    PrefetchKey,
    Recognition,
    Rule,
    Service,
    ServiceDef,
    norm_code,
)
from .yamlread import Loc, Located, Problem, format_path, read_yaml

# CDS Hooks 2.0: card summary "<140 characters"; the Inferno CRD kit fails 140 and more.
SUMMARY_LIMIT = 139
FACTS = ("payer", "title", "reference", "version")
# Evidence that argues for the service and evidence that argues against it: one word cannot be both.
PRO_KINDS = frozenset({"technique", "ambiguous-technique", "anatomy", "billing-code"})
CON_KINDS = frozenset({"other-anatomy", "look-alike", "billing-explanation", "comparator", "other-service"})
EXAMPLES_DIR = "examples"


def packaged_policy_dir() -> Path:
    """The policy folder shipped with the package, or the repository's cards/ when running from a checkout."""
    package = Path(__file__).resolve().parents[2]
    installed = package / "_cards"
    return installed if installed.is_dir() else package.parent / "cards"


# -- structural validation --------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys a model accepts at `loc` (for "did you mean"); [] when the place holds free-form keys."""
    current: list[Any] = [model]
    for part in loc:
        following: list[Any] = []
        for kind in current:
            for typ in _unwrap(kind):
                origin = get_origin(typ)
                if isinstance(typ, type) and issubclass(typ, BaseModel) and isinstance(part, str):
                    for name, info in typ.model_fields.items():
                        if part in (name, info.alias):
                            following.append(info.annotation)
                elif origin is list and isinstance(part, int):
                    following.append(get_args(typ)[0])
                elif origin is dict:
                    following.append(get_args(typ)[1])
        current = following
    keys: list[str] = []
    for kind in current:
        for typ in _unwrap(kind):
            if isinstance(typ, type) and issubclass(typ, BaseModel):
                keys += [info.alias or name for name, info in typ.model_fields.items()]
    return keys


def _message(error: Mapping[str, Any], loc: Loc, model: type[BaseModel] = s.PolicyFile) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}" if known else ""
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return f"{str(loc[-1])!r} is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        value = error.get("input")
        expected = str(error.get("ctx", {}).get("expected", ""))
        options = [o.strip().strip("'") for o in expected.replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


def _structure_problems(source: Path, located: Located, model: type[BaseModel], data: Any, base: Loc) -> list[Problem]:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc: Loc = tuple(p for p in error["loc"] if p != "[key]")
            full = (*base, *loc)
            message = _message(error, full, model)
            if "[key]" in error["loc"]:
                message = f"key {str(loc[-1])!r}: {message}" if loc else message
            problems.append(Problem(source, full, located.line_of(full), message))
        return problems
    return []


# -- compiling -----------------------------------------------------------------------------------------------------


@dataclass
class _Compiler:
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


def _written_again_with_attributes(c: _Compiler) -> None:
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


def _recognition(c: _Compiler, spec: s.Recognition, base: Loc) -> Recognition:
    places = _places(spec)
    systems = spec.code_systems
    aliases = {uri: alias for alias, uris in systems.items() for uri in uris}
    canonical = {alias: uris[0] for alias, uris in systems.items()}
    index = TermIndex()
    exact: dict[tuple[str, str], list[CodedMeaning]] = {}
    code_sets: list[CodeEntry] = []
    ranged: list[tuple[str, CodeSet, CodedMeaning, Loc]] = []

    def kind_places(kind: s.EvidenceKind, own: list[s.Place] | None, path: Loc) -> frozenset[s.Place]:
        if own is not None:
            return frozenset(own)
        if kind not in places:
            c.problem((*base, "places"), f"no places for {kind!r} evidence: add `{kind}: [...]` under places")
            return frozenset()
        return places[kind]

    def check_alias(alias: str, path: Loc) -> bool:
        if alias not in systems:
            close = difflib.get_close_matches(alias, list(systems), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; declared: {', '.join(systems)}"
            c.problem(path, f"code system {alias!r} is not declared in recognition.code_systems{hint}")
            return False
        return True

    def add_codes(alias: str, specs: list[str], meaning: CodedMeaning, path: Loc, *, prefixes: bool) -> None:
        if not check_alias(alias, path):
            return
        try:
            codes = CodeSet(specs, prefixes=prefixes)
        except ValueError as exc:
            c.problem(path, str(exc))
            return
        c.groups.add(meaning.group)
        c.kind_places.setdefault(meaning.kind, set()).update(meaning.places)
        for code in codes.exact:
            exact.setdefault((alias, code), []).append(meaning)
            c.add_code(alias, code, (meaning.kind, meaning.group), path)
        if codes.ranges or codes.prefixes:
            code_sets.append(CodeEntry(alias, codes, meaning))
            ranged.append((alias, codes, meaning, path))

    # Billing codes.
    billing_places = kind_places("billing-code", None, base)
    for alias, codes in spec.billing_codes.items():
        for code, entry in codes.items():
            display = entry if isinstance(entry, str) else entry.display
            group = "billing code" if isinstance(entry, str) else entry.group or "billing code"
            meaning = CodedMeaning("billing-code", group, display, billing_places)
            add_codes(alias, [code], meaning, (*base, "billing_codes", alias, code), prefixes=False)

    # Techniques.
    names: set[str] = set()
    technique_meanings: dict[str, Meaning] = {}
    for t, technique in enumerate(spec.techniques):
        tpath = (*base, "techniques", t)
        if technique.name in names:
            c.problem((*tpath, "name"), f"technique {technique.name!r} is listed twice")
        names.add(technique.name)
        kind: s.EvidenceKind = "ambiguous-technique" if technique.needs_anatomy else "technique"
        named = Meaning(kind, technique.name, kind_places(kind, technique.places, tpath))
        technique_meanings[technique.name] = named
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

    # The policy's anatomy, by region.
    anatomy = spec.anatomy
    apath = (*base, "anatomy")
    anatomy_places = kind_places("anatomy", None, apath)
    for region, rspec in anatomy.regions.items():
        rpath = (*apath, "regions", region)
        for alias, sites in rspec.codes.items():
            for code, site in sites.items():
                meaning = CodedMeaning("anatomy", region, site, anatomy_places, region=region)
                add_codes(alias, [code], meaning, (*rpath, "codes", alias, code), prefixes=False)
        c.add_terms(
            index,
            rspec.terms,
            (*rpath, "terms"),
            Meaning("anatomy", region, anatomy_places, region=region),
            kind_places=places,
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
            add_codes(alias, specs, meaning, (*dpath, "codes"), prefixes=alias.startswith("icd10"))

    # Other body regions.
    other_places = kind_places("other-anatomy", None, (*base, "other_anatomy"))
    c.add_terms(
        index,
        spec.other_anatomy.terms,
        (*base, "other_anatomy", "terms"),
        Meaning("other-anatomy", "", other_places),
        kind_places=places,
    )

    # Look-alikes.
    look_names: set[str] = set()
    for i, look in enumerate(spec.look_alikes):
        lpath = (*base, "look_alikes", i)
        if look.name in look_names:
            c.problem((*lpath, "name"), f"look-alike {look.name!r} is listed twice")
        look_names.add(look.name)
        if not look.terms and not look.codes:
            c.problem(lpath, "a look-alike needs codes or terms")
        lplaces = kind_places(look.kind, look.places, lpath)
        for alias, listed in look.codes.items():
            look_code = CodedMeaning(look.kind, look.name, look.name, lplaces)
            add_codes(alias, [str(x) for x in listed], look_code, (*lpath, "codes", alias), prefixes=False)
        c.add_terms(index, look.terms, (*lpath, "terms"), Meaning(look.kind, look.name, lplaces), kind_places=places)

    # Concept classes and the techniques composed of them (concepts.py).
    compositions = compile_concepts(c, spec, index, technique_meanings, places, base)

    # ConText triggers, terminators and answers: their own index, never evidence.
    context = TermIndex()
    for i, trigger in enumerate(spec.context):
        ref = ContextTrigger(trigger.name, trigger.assertion, trigger.direction, trigger.window)
        for t, term in enumerate(trigger.terms):
            _add_plain(c, context, term, ref, (*base, "context", i, "terms", t))
    for t, term in enumerate(spec.terminators):
        _add_plain(c, context, term, "terminate", (*base, "terminators", t))
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
    typo_words: set[str] = set()
    if spec.typos is not None:
        for k, kind in enumerate(spec.typos.kinds):
            if kind not in s.GUESS_KINDS:
                c.problem(
                    (*base, "typos", "kinds", k),
                    f"a typo may only be read as a word of what the order names ({', '.join(sorted(s.GUESS_KINDS))}):"
                    f" read as {kind} evidence, a guess would argue against the order",
                )
                continue
            typo_words |= {w for w in c.words.get(kind, ()) if len(w) >= spec.typos.min_length and w.isalpha()}
    known = set().union(*c.words.values()) if c.words else set()
    for trigger in spec.context:
        for term in trigger.terms:
            if term.term is not None:
                known.update(w for w in re.split(r"[^a-z0-9]+", fold(term.term).lower()) if w)

    # A code listed exactly under one meaning and inside a range or prefix of a contradicting one ("78305" beside
    # a look-alike's "78300-78320") is a contradiction like two exact codes.
    for alias, covered, meaning, path in ranged:
        for (code_alias, code), meanings in exact.items():
            if code_alias != alias or code in covered.exact or code not in covered:
                continue
            for other in meanings:
                if {meaning.kind, other.kind} & PRO_KINDS and {meaning.kind, other.kind} & CON_KINDS:
                    c.problem(
                        path,
                        f"contradiction: {alias} {code} is {_describe(other.kind, other.group)} and inside this "
                        f"range of {_describe(meaning.kind, meaning.group)}",
                    )
    c.check_duplicates()
    try:
        index.compile()
        context.compile()
    except TermError as exc:
        c.problem(base, str(exc))
    return Recognition(
        compositions=compositions,
        system_alias=aliases,
        canonical_system=canonical,
        order_fields=frozenset(spec.order_fields),
        exact_codes=exact,
        code_sets=code_sets,
        index=index,
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


def _add_plain(c: _Compiler, index: TermIndex, spec: s.TermSpec, ref: Any, path: Loc) -> None:
    try:
        if spec.pattern is not None:
            index.add_pattern(spec.pattern, ref)
        elif spec.term is not None:
            index.add(spec.term, ref, case=spec.case)
    except TermError as exc:
        c.problem(path, str(exc))


# -- the decision table ----------------------------------------------------------------------------------------

_FACT_NAMES = ("status", "intent")


def _condition(
    c: _Compiler,
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


def _rules(c: _Compiler, spec: s.PolicyFile) -> tuple[Rule, ...]:
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


# -- a whole file --------------------------------------------------------------------------------------------------


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


def _prefilter(spec: s.Recognition, rules: tuple[Rule, ...], rec: Recognition) -> None:
    """The words and codes without which no rule that tests evidence can hold: the cheap pass that lets most orders
    (labs, medications, imaging of other kinds) skip the full judgement. An order it skips has no evidence, so the
    rule that decides it (by its request facts) is the one the full judgement would name: the audit and the
    possible-misses review see the true rule."""
    needed: set[str] = set()
    for rule in rules:
        if not rule.flags:
            # Evidence of one of these kinds must be there for the rule to hold (a rule that could hold without
            # evidence but tests some: any kind it tests could make it the deciding one).
            needed |= _needs(rule.when) or _kinds_in(rule.when)
            continue
        kinds = _needs(rule.when)
        if kinds is None:
            return  # a flagging rule that needs no evidence: every order is judged in full
        needed |= kinds
    tokens: set[str] = set()
    patterns: list[re.Pattern[str]] = []

    def first_words(term: s.TermSpec) -> set[str]:
        words = [w for w in re.split(r"[^a-z0-9]+", fold(term.term or "").lower()) if w]
        # Separators between a term's words are optional, so its first word in a text is any run of its first
        # words written together ("video fluoroscopy" as "videofluoroscopy"); a plural may end the last.
        out = {"".join(words[:k]) for k in range(1, len(words) + 1)}
        joined = "".join(words)
        return out | {joined + "s", joined + "es"}

    def add(term: s.TermSpec) -> None:
        if term.pattern is not None:
            if term.pattern not in {p.pattern for p in patterns}:
                patterns.append(re.compile(term.pattern))
        elif term.term is not None:
            tokens.update(first_words(term))

    def rarest(groups: list[list[s.TermSpec]]) -> list[s.TermSpec]:
        """A combination holds only when every group of its words is there, so one group's words are enough to
        find its candidates: the group written without patterns whose shortest word is longest (the rarest)."""
        plain = [g for g in groups if all(t.pattern is None for t in g)] or groups
        return max(plain, key=lambda g: min((len(w) for t in g for w in first_words(t)), default=0))

    for technique in spec.techniques:
        for term in technique.terms:
            kind = (
                "ambiguous-technique"
                if (term.needs_anatomy if term.needs_anatomy is not None else technique.needs_anatomy)
                else "technique"
            )
            if kind in needed:
                add(term)
        if needed & {"technique", "ambiguous-technique"}:
            for combination in technique.combinations:
                for term in rarest(combination):
                    add(term)
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
            for term in rarest(slots):
                add(term)
    for look in spec.look_alikes:
        if look.kind in needed:
            for term in look.terms:
                add(term)
    if "anatomy" in needed:
        for region in spec.anatomy.regions.values():
            for term in region.terms:
                add(term)
    if "other-anatomy" in needed:
        for term in spec.other_anatomy.terms:
            add(term)
    for (_alias, code), meanings in rec.exact_codes.items():
        if any(m.kind in needed for m in meanings):
            tokens.add(code.lower())
    # Ranges and prefixes cannot be listed as words: the first pass tests the order's code values against them.
    rec.candidate_code_sets = tuple(entry.codes for entry in rec.code_sets if entry.meaning.kind in needed)
    rec.candidate_tokens = frozenset(tokens)
    rec.candidate_patterns = tuple(patterns)
    anatomy: set[str] = set()
    for region in spec.anatomy.regions.values():
        for term in region.terms:
            if term.term is not None:
                anatomy.update(w for w in re.split(r"[^a-z0-9]+", fold(term.term).lower()) if w)
    rec.anatomy_tokens = frozenset(anatomy)
    rec.prefilter = True


def _compile(c: _Compiler, spec: s.PolicyFile, digest: str) -> Policy:
    meta = spec.policy
    facts = {"payer": spec.payer.name, "title": meta.title, "reference": meta.reference, "version": meta.version}
    services = []
    for hook, sdef in (
        ("order-select", spec.services.order_select),
        ("order-sign", spec.services.order_sign),
        ("order-dispatch", spec.services.order_dispatch),
        ("appointment-book", spec.services.appointment_book),
        ("encounter-start", spec.services.encounter_start),
    ):
        if sdef is not None:
            services.append(ServiceDef(hook, sdef.id, sdef.title))
    if not services:
        c.problem(("services",), "name at least one hook (order-select, order-sign, ...)")

    card = spec.card
    summary = c.fill(card.summary, facts, ("card", "summary"))
    if len(summary) > SUMMARY_LIMIT:
        c.problem(("card", "summary"), f"{len(summary)} characters; a card summary must be under 140")
    reasons = tuple(Coding(card.override_reasons.system, r.code, r.display) for r in card.override_reasons.reasons)
    if len({r.code for r in reasons}) != len(reasons):
        c.problem(("card", "override_reasons", "reasons"), "override reason codes must be unique")
    instructions = card.instructions
    recognition = _recognition(c, spec.recognition, ("recognition",))

    def coding(spec_: s.CodingSpec) -> Coding:
        return Coding(spec_.system, spec_.code, spec_.display)

    alternatives: dict[str, Alternative] = {}
    for region, alt in spec.alternatives.regions.items():
        if region not in spec.recognition.anatomy.regions:
            c.problem(
                ("alternatives", "regions", region),
                f"region {region!r} is not one of recognition.anatomy.regions ({', '.join(recognition.regions)})",
            )
        named = {**facts, "alternative": alt.label}
        alternatives[region] = Alternative(
            region=region,
            label=alt.label,
            code=coding(alt.code),
            body_site=coding(alt.body_site),
            suggestion_label=c.fill(card.alternative.label, named, ("card", "alternative", "label")),
            instead=c.fill(card.alternative.instead, named, ("card", "alternative", "instead")),
        )
    if not alternatives:
        # The {alternative} placeholders are still checked when no region has an alternative.
        c.fill(card.alternative.label, {**facts, "alternative": ""}, ("card", "alternative", "label"))
        c.fill(card.alternative.instead, {**facts, "alternative": ""}, ("card", "alternative", "instead"))

    text = CardText(
        indicator=card.indicator,
        summary=summary,
        matched=c.fill(card.matched, facts, ("card", "matched")),
        position=c.fill(card.position, facts, ("card", "position")),
        evidence=c.fill(card.evidence, facts, ("card", "evidence")),
        footer=c.fill(card.footer, facts, ("card", "footer")),
        links=tuple(Link(link.label, link.url, link.detail) for link in card.links),
        override_reasons=reasons,
        guideline_topic=coding(card.guideline.topic),
        guideline_instead=c.fill(card.guideline.instead, facts, ("card", "guideline", "instead")),
        alternative_topic=coding(card.alternative.topic),
        alternative_remove=c.fill(card.alternative.remove, facts, ("card", "alternative", "remove")),
        alternative_description=c.fill(card.alternative.description, facts, ("card", "alternative", "description")),
        instructions_topic=coding(instructions.topic) if instructions else None,
        instructions_summary=c.fill(instructions.summary, facts, ("card", "instructions", "summary"))
        if instructions
        else None,
        instructions_detail=c.fill(instructions.detail, facts, ("card", "instructions", "detail"))
        if instructions
        else None,
    )
    # The detail holds the order's name (at most 12 words) and why it matched besides these words: they may take at
    # most two thirds of the card's MAX_DETAIL_WORDS, so the whole reads without scrolling.
    instead = max([text.guideline_instead, *(a.instead for a in alternatives.values())], key=word_count)
    links = " ".join(link.detail for link in text.links if link.detail)
    own = word_count(" ".join([text.matched, "What to do:", instead, text.position, text.evidence, text.footer, links]))
    if own > MAX_DETAIL_WORDS * 2 // 3:
        c.problem(
            ("card",),
            f"the card's own words (matched, instead, position, evidence, footer, link labels) come to {own}; at most "
            f"{MAX_DETAIL_WORDS * 2 // 3} leave room for the order's name and why it matched in "
            f"{MAX_DETAIL_WORDS} words",
        )
    if text.instructions_detail and word_count(text.instructions_detail) > MAX_DETAIL_WORDS - 12:
        c.problem(("card", "instructions", "detail"), f"at most {MAX_DETAIL_WORDS - 12} words")
    if text.instructions_summary and len(text.instructions_summary) > SUMMARY_LIMIT:
        c.problem(("card", "instructions", "summary"), "a card summary must be under 140 characters")
    topics = [text.guideline_topic.code, text.alternative_topic.code]
    if text.instructions_topic:
        topics.append(text.instructions_topic.code)
    if len(set(topics)) != len(topics):
        # Each card type is switched on and off by its topic code (CRD davinci-crd.configuration-options, dev-5).
        c.problem(("card",), f"each card type needs its own topic code, got {topics}")
    rules = _rules(c, spec)
    _prefilter(spec.recognition, rules, recognition)
    return Policy(
        id=meta.id,
        title=meta.title,
        version=meta.version,
        status=meta.status,
        covered=COVERED_BY_STATUS[meta.status],
        reference=meta.reference,
        url=meta.url,
        payer=spec.payer.name,
        services=services,
        description=" ".join(spec.services.description.split()),
        card=text,
        coverage_reason=c.fill(spec.coverage.reason, facts, ("coverage", "reason")),
        coverage_action=c.fill(spec.coverage.action, facts, ("coverage", "action")),
        alternatives=alternatives,
        region_from=tuple(frozenset(group) for group in spec.alternatives.region_from),
        replacement_note=c.fill(spec.alternatives.note, facts, ("alternatives", "note"), keep=("order",)),
        recognition=recognition,
        rules=rules,
        prefetch={name: PrefetchKey(p.query, p.required) for name, p in spec.prefetch.items()},
        source=c.source,
        sha256=digest,
    )


def _without(data: Any, errors: list[Any]) -> bool:
    """Drop the mapping keys under the errors' locations (in place); False when nothing could be dropped."""
    dropped = False
    for error in errors:
        loc = [p for p in error["loc"] if p != "[key]"]
        if error["type"] == "missing":
            loc = loc[:-1]  # the key is absent: drop the mapping that lacks it
        # The deepest mapping key on the path: list items are never removed, so later paths keep their indexes.
        while loc and not isinstance(loc[-1], str):
            loc = loc[:-1]
        if not loc:
            continue
        parent: Any = data
        try:
            for part in loc[:-1]:
                parent = parent[part]
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(parent, dict) and loc[-1] in parent:
            del parent[loc[-1]]
            dropped = True
    return dropped


def _repaired(data: Any) -> s.PolicyFile | None:
    """The file with every part that breaks the format left out, so the other checks still run on the rest (an
    analyst sees every problem of the file in one run, not one per run)."""
    work = copy.deepcopy(data)
    for _ in range(50):
        try:
            return s.PolicyFile.model_validate(work)
        except ValidationError as exc:
            if not _without(work, exc.errors()):
                return None
    return None


def load_policy_file(source: Path) -> tuple[Policy | None, list[Problem]]:
    """Read, validate and compile one policy file; every problem found is returned, none raised."""
    try:
        raw = source.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(source, (), None, f"cannot read: {exc}")]
    located = read_yaml(source, text)
    problems = list(located.problems)
    if located.data is None and not problems:
        problems.append(Problem(source, (), None, "the file is empty"))
    if located.data is None:
        return None, problems
    if not isinstance(located.data, dict):
        return None, [*problems, Problem(source, (), 1, "the file must hold a mapping (policy:, card:, ...)")]
    structure = _structure_problems(source, located, s.PolicyFile, located.data, ())
    problems += structure
    spec = _repaired(located.data) if structure else s.PolicyFile.model_validate(located.data)
    if spec is None:
        return None, problems
    spec, used, language_problems = _with_languages(source, located, spec)
    problems += language_problems
    digest = hashlib.sha256(raw)
    for part in used:  # a change to a language file the policy reads is a change to the policy
        digest.update(part)
    compiler = _Compiler(source, located)
    policy = _compile(compiler, spec, digest.hexdigest())
    # A part left out for a format problem can cause follow-on problems (a rule naming a dropped condition): each
    # place is reported once, with the format problem first.
    # ... and a problem on a part that contains a reported one (its parent mapping) is a consequence too.
    reported = {p.path for p in structure}
    problems += [
        p for p in compiler.problems if not any(p.path[: len(r)] == r or r[: len(p.path)] == p.path for r in reported)
    ]
    return (policy if not problems else None), problems


# -- shared language files -----------------------------------------------------------------------------------------


def _read_language(path: Path) -> tuple[Language | None, bytes, list[Problem]]:
    """One language file, validated as strictly as a policy: format, terms, answers, each problem with its line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, b"", [Problem(path, (), None, f"cannot read: {exc}")]
    located = read_yaml(path, text)
    problems = list(located.problems)
    if located.data is None or not isinstance(located.data, dict):
        if not problems:
            problems.append(Problem(path, (), 1, "a language file holds a mapping (language:, context:, ...)"))
        return None, raw, problems
    problems += _structure_problems(path, located, LanguageFile, located.data, ())
    if problems:
        return None, raw, problems
    spec = LanguageFile.model_validate(located.data)
    if spec.language.code != path.stem:
        problems.append(
            Problem(
                path,
                ("language", "code"),
                located.line_of(("language", "code")),
                f"the file {path.name} must hold language {path.stem!r}, not {spec.language.code!r}",
            )
        )
    c = _Compiler(path, located)
    index = TermIndex()
    for i, trigger in enumerate(spec.context):
        ref = ContextTrigger(trigger.name, trigger.assertion, trigger.direction, trigger.window)
        for t, term in enumerate(trigger.terms):
            _add_plain(c, index, term, ref, ("context", i, "terms", t))
    for t, term in enumerate(spec.terminators):
        _add_plain(c, index, term, "terminate", ("terminators", t))
    answers: dict[str, set[str]] = {"yes": set(), "no": set()}
    for answer in ("yes", "no"):
        for t, term in enumerate(getattr(spec.questions, answer) if spec.questions else []):
            if term.term is None:
                c.problem(("questions", answer, t), "an answer is a word or phrase, not a pattern")
            else:
                answers[answer].add(term_key(term.term, case=False))
    for both in sorted(answers["yes"] & answers["no"]):
        c.problem(("questions",), f"{both!r} is listed as both a yes and a no answer")
    try:
        index.compile()
    except TermError as exc:
        c.problem((), str(exc))
    problems += c.problems
    return (Language(path, spec, located.lines) if not problems else None), raw, problems


def _with_languages(
    source: Path, located: Located, spec: s.PolicyFile
) -> tuple[s.PolicyFile, list[bytes], list[Problem]]:
    """The policy with its languages' sections filled in, the bytes of the language files read, and their problems."""
    rec = spec.recognition
    codes = rec.languages if "languages" in rec.model_fields_set else list(DEFAULT_LANGUAGES)
    packaged = packaged_policy_dir()
    languages: list[Language] = []
    used: list[bytes] = []
    problems: list[Problem] = []
    for i, code in enumerate(codes):
        path = language_path(code, source.parent, packaged)
        where: Loc = ("recognition", "languages", i)
        if code in codes[:i]:
            problems.append(Problem(source, where, located.line_of(where), f"language {code!r} is named twice"))
            continue
        if path is None:
            known = sorted({p.stem for folder in (source.parent, packaged) for p in language_files(folder)})
            close = difflib.get_close_matches(code, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known) or 'none'}"
            problems.append(
                Problem(
                    source,
                    where,
                    located.line_of(where),
                    f"no language file {code}.yaml in {LANGUAGES_DIR}/ here or shipped{hint}",
                )
            )
            continue
        language, raw, found = _read_language(path)
        used.append(raw)
        problems += found
        if language is not None:
            languages.append(language)
    merged, found = merged_recognition(rec, languages)
    return spec.model_copy(update={"recognition": merged}), used, problems + found


def policy_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def check_policies(directory: Path | str | None = None) -> tuple[PolicySet | None, list[Problem]]:
    """Every policy in the folder; (None, problems) when any file has a problem."""
    folder = Path(directory) if directory else packaged_policy_dir()
    if not folder.is_dir():
        return None, [Problem(folder, (), None, "policy folder not found")]
    files = policy_files(folder)
    if not files:
        return None, [Problem(folder, (), None, "no policy files (*.yaml) in the folder")]
    policies: list[Policy] = []
    problems: list[Problem] = []
    for path in files:
        policy, found = load_policy_file(path)
        problems += found
        if policy is not None:
            policies.append(policy)
    seen: dict[str, Path] = {}
    for policy in policies:
        if policy.id in seen:
            problems.append(
                Problem(
                    policy.source,
                    ("policy", "id"),
                    None,
                    f"policy id {policy.id!r} is already used by {seen[policy.id]}",
                )
            )
        seen[policy.id] = policy.source
    services: dict[str, Service] = {}
    for policy in policies:
        for sdef in policy.services:
            existing = services.get(sdef.id)
            if existing and existing.hook != sdef.hook:
                problems.append(
                    Problem(
                        policy.source,
                        ("services",),
                        None,
                        f"service id {sdef.id!r} is used for {existing.hook} elsewhere; each service answers one hook",
                    )
                )
                continue
            if existing:
                services[sdef.id] = Service(
                    sdef.id,
                    sdef.hook,
                    existing.title,
                    f"{existing.description} {policy.description}",
                    (*existing.policies, policy),
                )
            else:
                services[sdef.id] = Service(sdef.id, sdef.hook, sdef.title, policy.description, (policy,))
    examples = folder / EXAMPLES_DIR
    for policy in policies:
        policy.examples = examples if examples.is_dir() else None
    if problems:
        return None, problems
    return PolicySet(policies, services, folder), []


def load_policies(directory: Path | str | None = None) -> PolicySet:
    """Every policy in the folder; PolicyError lists every problem of every file."""
    policies, problems = check_policies(directory)
    if policies is None:
        raise PolicyError(problems)
    return policies
