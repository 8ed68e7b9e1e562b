"""A loaded policy, compiled for judging orders: codes in sets, words in one index, the decision table as a tree."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..terms import TermIndex
from .schema import Assertion, EvidenceKind, Judgement, Place

COVERED_BY_STATUS = {
    # Da Vinci CRD ext-coverage-information `covered` (covered | not-covered | conditional). CRD has no
    # "investigational" code: an investigational service is not covered, the reason says why.
    "investigational": "not-covered",
    "not-covered": "not-covered",
    "covered": "covered",
    "conditional": "conditional",
}


class PolicyError(ValueError):
    """One or more policy files are broken; the message lists every problem with its file, path and line."""

    def __init__(self, problems: Iterable[object]) -> None:
        self.problems = [str(p) for p in problems]
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str

    def to_fhir(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


def norm_code(code: object) -> str:
    """Codes compared as clients vary them: case, spaces, and ICD-10-CM with or without its dot."""
    return str(code).strip().upper().replace(".", "")


class CodeSet:
    """Codes written as exact codes, ranges ("77001-77003", "M40-M54") or ICD-10 prefixes ("S13.4")."""

    def __init__(self, specs: Iterable[str], *, prefixes: bool) -> None:
        self.exact: set[str] = set()
        self.ranges: list[tuple[str, str]] = []
        self.prefixes: list[str] = []
        for raw in specs:
            spec = norm_code(raw)
            # "A-B" with both ends the same length is a range; LOINC codes ("24945-8") carry a check digit instead.
            bounds = re.fullmatch(r"([A-Z0-9]+)-([A-Z0-9]+)", spec)
            if bounds and len(bounds[1]) == len(bounds[2]):
                if bounds[1] > bounds[2]:
                    raise ValueError(f"range {raw!r} runs backwards")
                self.ranges.append((bounds[1], bounds[2]))
            elif prefixes:
                self.prefixes.append(spec)
            else:
                self.exact.add(spec)

    def __contains__(self, code: object) -> bool:
        key = norm_code(code)
        if not key:
            return False
        if key in self.exact:
            return True
        for low, high in self.ranges:
            if key[0].isdigit() == low[0].isdigit():
                # ICD-10 ranges cover whole three-character categories; CPT ranges compare equal-length numbers.
                part = key[: len(low)] if not low[0].isdigit() else key
                if len(part) == len(low) and low <= part <= high:
                    return True
        return any(key.startswith(p) for p in self.prefixes)


@dataclass(frozen=True)
class Meaning:
    """What a phrase means in a policy: the evidence it gives, in which group, and where it counts."""

    kind: EvidenceKind
    group: str
    places: frozenset[Place]
    region: str = ""
    # A part of a combination: (combination id, part index, number of parts).
    combo: tuple[str, int, int] | None = None
    # An acronym listed in one case that counts in any case only beside evidence of these kinds ("dmx neck").
    exact_key: str = ""
    any_case_with: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CodedMeaning:
    """What a code means in a policy (a billing code, a body site, a diagnosis, a look-alike's code)."""

    kind: EvidenceKind
    group: str
    display: str
    places: frozenset[Place]
    region: str = ""
    specificity: int = 0
    group_name: str = ""


@dataclass(frozen=True)
class CodeEntry:
    alias: str
    codes: CodeSet
    meaning: CodedMeaning


@dataclass(frozen=True)
class ContextTrigger:
    """A ConText trigger term: what it does to the mentions it reaches."""

    name: str
    assertion: Assertion
    direction: str
    window: int


@dataclass(frozen=True)
class ConceptRef:
    """A word of a concept class (a modality, a movement, a non-motion use): never evidence on its own."""

    name: str


@dataclass(frozen=True)
class Composition:
    """A technique named by its parts within one sentence: a concept from each slot, none from `unless`."""

    name: str
    meaning: Meaning
    slots: tuple[frozenset[str], ...]
    unless: frozenset[str] = frozenset()


class CandidatePattern(NamedTuple):
    """A pattern of the first pass, with a piece of text every match contains (lower case; None when the pattern has
    none of two or more characters), a whole word when `word`: an order whose text or words lack it is not searched
    (a regex with lookbehinds or IGNORECASE is tried at every position, ~5 us per order; the test is a tenth)."""

    pattern: re.Pattern[str]
    needs: str | None
    word: bool


@dataclass(eq=False)  # hashed by identity: lookups are cached per policy
class Recognition:
    system_alias: dict[str, str]
    # The first URI listed for each alias: what the service writes when it names a code (CRD billingCode).
    canonical_system: dict[str, str]
    order_fields: frozenset[Place]
    # Exact codes by (alias, code), and code sets (ranges, prefixes) checked in order.
    exact_codes: dict[tuple[str, str], list[CodedMeaning]]
    code_sets: list[CodeEntry]
    index: TermIndex
    anatomy: str
    regions: tuple[str, ...]
    # ConText: triggers and terminators in their own index, so they never count as evidence.
    context: TermIndex
    context_kinds: frozenset[str] = frozenset()
    # Answers to order questions, as term keys ("no", "n", "false" ...).
    yes_answers: frozenset[str] = frozenset()
    no_answers: frozenset[str] = frozenset()
    # Typos: the long words of the policy's terms a misspelling may stand for, and every word it knows.
    typo_words: tuple[str, ...] = ()
    known_words: frozenset[str] = frozenset()
    typo_min_length: int = 8
    typo_max_edits: int = 1
    typo_long_length: int = 99
    typo_max_edits_long: int = 1
    abbreviations: dict[str, str] = field(default_factory=dict)
    # The cheap first pass: an order none of whose words (lower case, accents removed) is in `candidate_tokens` and
    # which matches none of `candidate_patterns` cannot meet any flagging rule of the decision table. Empty when
    # some flagging rule needs no evidence (then every order is judged in full).
    candidate_tokens: frozenset[str] = frozenset()
    candidate_patterns: tuple[CandidatePattern, ...] = ()
    # Code ranges and prefixes of the kinds the table tests (M40-M54): an order's code values are tested against them.
    candidate_code_sets: tuple[CodeSet, ...] = ()
    prefilter: bool = False
    # Spine words: beside them the first pass also reads misspelled and abbreviated words (as the evidence step does).
    anatomy_tokens: frozenset[str] = frozenset()
    # Techniques named by their parts (concept classes composed within one sentence).
    compositions: tuple[Composition, ...] = ()


# -- the decision table --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvidenceTest:
    kind: EvidenceKind
    places: frozenset[Place] | None
    assertions: frozenset[str]
    groups: frozenset[str] | None = None


@dataclass(frozen=True)
class FactTest:
    fact: str  # status | intent | do_not_perform
    values: frozenset[str]


@dataclass(frozen=True)
class Group:
    all: tuple[Cond, ...] = ()
    any: tuple[Cond, ...] = ()
    unless: tuple[Cond, ...] = ()


Cond = EvidenceTest | FactTest | Group


@dataclass(frozen=True)
class Rule:
    id: str
    when: Cond | None
    verdict: Judgement
    reason: str
    # The orders it decides are possible misses, listed for the analyst (policy `review: true`).
    review: bool = False

    @property
    def flags(self) -> bool:
        return self.verdict == "flagged"


# -- what a clinician and a claim see ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Alternative:
    region: str
    label: str
    code: Coding
    body_site: Coding
    suggestion_label: str
    instead: str  # the Propose Alternate Request card's "what to do" line, naming this alternative


@dataclass(frozen=True)
class PrefetchKey:
    """A prefetch template the policy wants; `required` makes a call without it a 412 (CDS Hooks 2.0)."""

    query: str
    required: bool = False


@dataclass(frozen=True)
class ServiceDef:
    hook: str
    id: str
    title: str


@dataclass(frozen=True)
class Link:
    label: str
    url: str
    detail: str | None  # its short label in a card's detail, when the detail links to it


@dataclass(frozen=True)
class CardText:
    """The wording of a policy's cards: the shared parts, then what each CRD card type adds."""

    indicator: str
    summary: str
    matched: str
    position: str
    evidence: str
    footer: str
    links: tuple[Link, ...]
    override_reasons: tuple[Coding, ...]
    # External Reference card (CRD cards.html#external-reference).
    guideline_topic: Coding
    guideline_instead: str
    # Propose Alternate Request card (CRD cards.html#propose-alternate-request); {alternative} is filled per order.
    alternative_topic: Coding
    alternative_remove: str
    alternative_description: str
    # Instructions card (CRD cards.html#instructions-response-type), when the policy words one.
    instructions_topic: Coding | None
    instructions_summary: str | None
    instructions_detail: str | None


@dataclass(eq=False)
class Policy:
    id: str
    title: str
    version: str
    status: str
    covered: str
    reference: str
    url: str
    payer: str
    services: list[ServiceDef]
    description: str
    card: CardText
    coverage_reason: str
    coverage_action: str
    alternatives: dict[str, Alternative]
    region_from: tuple[frozenset[Place], ...]
    replacement_note: str
    recognition: Recognition
    rules: tuple[Rule, ...]
    prefetch: dict[str, PrefetchKey]
    source: Path
    sha256: str
    examples: Path | None = None

    def rule(self, rule_id: str) -> Rule:
        return next(r for r in self.rules if r.id == rule_id)

    @functools.cached_property
    def review_rules(self) -> frozenset[str]:
        """The ids of the rules marked `review: true` (a not-flagged order they decide is a possible miss)."""
        return frozenset(r.id for r in self.rules if r.review)


@dataclass(frozen=True)
class Service:
    """A CDS service as discovery lists it: one hook, and the policies it applies."""

    id: str
    hook: str
    title: str
    description: str
    policies: tuple[Policy, ...]

    @property
    def prefetch(self) -> dict[str, PrefetchKey]:
        merged: dict[str, PrefetchKey] = {}
        for policy in self.policies:
            for name, key in policy.prefetch.items():
                known = merged.get(name)
                merged[name] = PrefetchKey(key.query, key.required or (known.required if known else False))
        return merged


@dataclass
class PolicySet:
    policies: list[Policy]
    services: dict[str, Service]
    folder: Path
