"""The policy file format as a strict model: every key known, every type checked, the JSON Schema derived from it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, WithJsonSchema, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

# Where an order carries meaning (engine.orders reads each of these).
Place = Literal[
    "code",
    "detail",
    "body_site",
    "reason",
    "note",
    "instruction",
    "category",
    "performer",
    "location",
    "supporting_info",
]
PLACES: tuple[Place, ...] = Place.__args__  # type: ignore[attr-defined]

# The fixed vocabulary of evidence a policy's words and codes produce, and its decision rules test.
EvidenceKind = Literal[
    "billing-code",  # one of the policy's billing codes
    "technique",  # a name of the service that means it on its own (digital motion x-ray)
    "ambiguous-technique",  # a name that means it only with evidence of the policy's anatomy (VMA, videofluoroscopy)
    "anatomy",  # the policy's body region (a spine body site, spine words, a spine diagnosis)
    "other-anatomy",  # another body region (a wrist, a knee, the heart)
    "look-alike",  # the order is another procedure that shares words with this one (a swallow study)
    "billing-explanation",  # what else the billing code bills here (a scoliosis series billed as 76499)
    "comparator",  # the covered comparator or a neighbouring service; shown, never decisive on its own
    "other-service",  # the order belongs to another service line (laboratory, eye clinic) by category or performer
]
EVIDENCE_KINDS: tuple[str, ...] = EvidenceKind.__args__  # type: ignore[attr-defined]
# What a guessed reading (a typo, an abbreviation, a word cut at a field's end) may be read as: the order's own
# subject. A guess may help recognise what the order names; it must never create evidence against it.
GUESS_KINDS: frozenset[str] = frozenset({"technique", "ambiguous-technique", "anatomy"})
# Evidence that argues for the service and evidence that argues against it: one word cannot be both.
PRO_KINDS: frozenset[str] = frozenset({"billing-code", "technique", "ambiguous-technique", "anatomy"})
CON_KINDS: frozenset[str] = frozenset(
    {"other-anatomy", "look-alike", "billing-explanation", "comparator", "other-service"}
)

# ConText categories (Harkema et al. 2009, "ConText: an algorithm for determining negation, experiencer, and
# temporal status from clinical reports"), with "affirmed" for a mention the order asserts and "requested" for one
# a trigger asks for explicitly ("repeat DMX", "please perform as kinematic MRI"). Both are asserted.
Assertion = Literal["affirmed", "requested", "negated", "historical", "hypothetical", "other-experiencer"]
ASSERTED: frozenset[str] = frozenset({"affirmed", "requested"})
ASSERTIONS: tuple[str, ...] = Assertion.__args__  # type: ignore[attr-defined]

Judgement = Literal["flagged", "not-flagged"]
Status = Literal["investigational", "not-covered", "covered", "conditional"]
Hook = Literal["order-select", "order-sign"]


class Strict(BaseModel):
    """Every model refuses keys it does not know: a misspelled key must stop the load, never switch a rule off."""

    # Unquoted codes (76120) are text to the analyst; numbers become strings where text is expected.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, coerce_numbers_to_str=True)


Text = Annotated[str, Field(min_length=1)]
# A code as the analyst writes it: quoted or not (YAML reads an unquoted 76120 as a number; the loader keeps the text).
Code = Annotated[str, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})]


class PolicyMeta(Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", description="Stable id, lower case and hyphens")]
    title: Text
    version: Annotated[str, Field(min_length=1, description='Quote it in YAML: "2026.12.0"')]
    status: Annotated[Status, Field(description="Coverage status; the CRD `covered` value follows from it")]
    reference: Annotated[str, Field(min_length=1, description='The payer\'s policy number, e.g. "6.01.46"')]
    url: Annotated[str, Field(pattern=r"^https?://\S+$")]


class Payer(Strict):
    name: Annotated[str, Field(min_length=1, description="Shown to clinicians as the card's source")]


class ServiceSpec(Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    title: Text


class Services(Strict):
    order_select: Annotated[ServiceSpec | None, Field(alias="order-select")] = None
    order_sign: Annotated[ServiceSpec | None, Field(alias="order-sign")] = None
    # CRD's other primary hooks (order-dispatch, appointment-book) and encounter-start (CRD ops-1).
    order_dispatch: Annotated[ServiceSpec | None, Field(alias="order-dispatch")] = None
    appointment_book: Annotated[ServiceSpec | None, Field(alias="appointment-book")] = None
    encounter_start: Annotated[ServiceSpec | None, Field(alias="encounter-start")] = None
    description: Text


class PrefetchSpec(Strict):
    query: Text
    required: bool = False


class CodingSpec(Strict):
    system: Annotated[str, Field(pattern=r"^(https?://|urn:)\S+$")]
    code: Text
    display: Text


class LinkSpec(Strict):
    label: Text
    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    # A short label for the link inside the card's detail (markdown): the Propose Alternate Request card may carry
    # no Card.links (CRD 2.2 logical model CRDCDSHooksAlternateResponse: links 0..0), so its detail links instead.
    detail: Annotated[str | None, Field(min_length=1, description="Short label of the link in the card's detail")] = (
        None
    )


class OverrideReason(Strict):
    code: Text
    display: Text


class OverrideReasons(Strict):
    system: Annotated[str, Field(pattern=r"^https?://\S+$")]
    reasons: Annotated[list[OverrideReason], Field(min_length=1)]


class GuidelineCard(Strict):
    """The CRD External Reference card: the policy's links, no suggestions (CRD cards.html#external-reference)."""

    topic: CodingSpec
    instead: Annotated[str, Field(min_length=1, description="What to do, when no alternative order is proposed")]


class AlternativeCard(Strict):
    """The CRD Propose Alternate Request card: one suggestion that deletes the order and creates the alternative."""

    topic: CodingSpec
    instead: Annotated[str, Field(min_length=1, description="What to do; {alternative} names the alternative")]
    label: Annotated[str, Field(min_length=1, description="The suggestion's label; {alternative} names it")]
    remove: Annotated[str, Field(min_length=1, description="The delete action's description")]
    description: Annotated[str, Field(min_length=1, description="The create action's description")]


class InstructionsCard(Strict):
    """The CRD Instructions card: what happens if the order goes ahead anyway (no links, no suggestions)."""

    topic: CodingSpec
    summary: Text
    detail: Text


class CardSpec(Strict):
    indicator: Literal["info", "warning", "critical"]
    summary: Annotated[str, Field(min_length=1, description="Under 140 characters after placeholders are filled")]
    matched: Annotated[str, Field(min_length=1, description="Follows the order's name on the card's first line")]
    position: Text
    evidence: Text
    footer: Annotated[str, Field(min_length=1, description="The card's last line (how to report a false alarm)")]
    links: Annotated[list[LinkSpec], Field(min_length=1)]
    override_reasons: OverrideReasons
    guideline: GuidelineCard
    alternative: AlternativeCard
    instructions: InstructionsCard | None = None


class CoverageSpec(Strict):
    """Da Vinci CRD coverage-information; `covered` follows from policy.status."""

    reason: Annotated[str, Field(min_length=1, description="The coverage-information reason text")]
    action: Annotated[str, Field(min_length=1, description="The systemAction's description")]


class AlternativeSpec(Strict):
    label: Text
    code: CodingSpec
    body_site: CodingSpec


class Alternatives(Strict):
    # Where the order's region is read to choose an alternative: the first group of places that names exactly one
    # region decides (what the order asks for before why it is asked).
    region_from: Annotated[list[list[Place]], Field(min_length=1)]
    note: Annotated[str, Field(min_length=1, description="Note on the replacement order; {order} names the draft")]
    regions: dict[str, AlternativeSpec] = Field(default_factory=dict)


class TermSpec(Strict):
    """A phrase or a regular expression, with where it counts and what it needs."""

    term: str | None = None
    pattern: str | None = None
    case: Annotated[bool, Field(description="Match exactly this case (acronyms: DMX, VMA)")] = False
    places: list[Place] | None = None
    needs_anatomy: bool | None = None
    # An acronym written in capitals (DMX) that also counts in any case ("dmx neck") when the order has evidence of
    # one of these kinds, e.g. anatomy: lower-case acronyms are typed where the context is imaging.
    any_case_with: list[EvidenceKind] | None = None
    lang: Annotated[str | None, Field(pattern=r"^[a-z]{2}$", description="Language of the term (en, es, ...)")] = None

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, value: Any) -> Any:
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted yes/no/on/off/true/false as booleans, not words.
            raise ValueError(f'YAML read this term as {str(value).lower()}: quote the word, e.g. "no" or "yes"')
        if isinstance(value, int | float):
            return {"term": str(value)}
        return {"term": value} if isinstance(value, str) else value

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # A term is written as plain text or as a mapping: the editor must accept both.
        mapping = handler(schema)
        return {"anyOf": [{"type": "string", "minLength": 1}, mapping]}

    @model_validator(mode="after")
    def _one_of(self) -> TermSpec:
        if (self.term is None) == (self.pattern is None):
            raise ValueError("a term has either `term:` or `pattern:`")
        if self.term is not None and not self.term.strip():
            raise ValueError("a term must not be empty")
        return self


Terms = list[TermSpec]


class TechniqueSpec(Strict):
    name: Text
    needs_anatomy: Annotated[
        bool, Field(description="Default for its terms: true when the words also name studies of other organs")
    ] = False
    terms: Terms = Field(default_factory=list)
    # Each combination: groups of words that together name the technique (one word from every group).
    combinations: list[Annotated[list[Terms], Field(min_length=2)]] = Field(default_factory=list)
    places: list[Place] | None = None


class ConceptSpec(Strict):
    """A class of words that mean one thing in an order (a modality able to record motion, a movement, a non-motion
    use such as guidance): the parts compositions are built from."""

    terms: Annotated[Terms, Field(min_length=1)]


ConceptName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]


class CompositionSpec(Strict):
    """A technique named by its parts: one concept of every `all` entry (a list is any one of its concepts) within
    one sentence of one text, and none of `unless` in that sentence."""

    name: Text
    # The technique the composition names (one of `techniques:`): its group, places and needs_anatomy default.
    technique: Text
    all: Annotated[list[ConceptName | Annotated[list[ConceptName], Field(min_length=1)]], Field(min_length=2)]
    unless: list[ConceptName] = Field(default_factory=list)
    needs_anatomy: bool | None = None


class RegionSpec(Strict):
    codes: dict[str, dict[str, Text]] = Field(default_factory=dict)
    terms: Terms = Field(default_factory=list)


class DiagnosisSpec(Strict):
    codes: Annotated[Code, Field(min_length=1, description='Codes, ranges ("M40-M54") or prefixes, comma-separated')]
    display: Text
    region: str | None = None


class AnatomySpec(Strict):
    name: Annotated[str, Field(min_length=1, description="The body part the policy is about, e.g. spine")]
    regions: Annotated[dict[str, RegionSpec], Field(min_length=1)]
    diagnoses: dict[str, list[DiagnosisSpec]] = Field(default_factory=dict)


class OtherAnatomySpec(Strict):
    terms: Terms = Field(default_factory=list)


class LookAlikeSpec(Strict):
    name: Text
    kind: Literal["look-alike", "billing-explanation", "comparator", "other-service"]
    places: list[Place] | None = None
    codes: dict[str, list[Code]] = Field(default_factory=dict)
    terms: Terms = Field(default_factory=list)


class ContextSpec(Strict):
    """A ConText trigger: words that change what the mentions near them assert."""

    name: Text
    assertion: Literal["negated", "historical", "hypothetical", "other-experiencer", "requested"]
    direction: Literal["forward", "backward", "both"]
    terms: Annotated[Terms, Field(min_length=1)]
    # How many words the trigger reaches (ConText's window); a terminator or the end of the sentence stops it sooner.
    window: Annotated[int, Field(ge=1, le=20)] = 6


class QuestionsSpec(Strict):
    """Order questions written "Question? Answer" or "Question: answer" (R4) or as R5 orderDetail parameters."""

    yes: Annotated[Terms, Field(min_length=1)]
    no: Annotated[Terms, Field(min_length=1)]


class TyposSpec(Strict):
    """Typos beyond the listed misspellings: a long word within `max_edits` edits (insertions, deletions,
    substitutions, transpositions) of a word of the policy's terms is read as that word."""

    min_length: Annotated[int, Field(ge=4, le=30)] = 8
    max_edits: Annotated[int, Field(ge=1, le=2)] = 1
    # Longer words may carry two edits ("analisys" for "analysis"): from this length on.
    two_edits_from: Annotated[int | None, Field(ge=6, le=30)] = None
    # Whose words a typo may stand for.
    kinds: Annotated[list[EvidenceKind], Field(min_length=1)]


_CONTEXT_KINDS: tuple[EvidenceKind, ...] = (
    "technique",
    "ambiguous-technique",
    "look-alike",
    "billing-explanation",
    "comparator",
)


class BillingCodeSpec(Strict):
    display: Text
    # A name rules can test (`group:`), e.g. "unlisted" for the codes that bill anything.
    group: str | None = None


class Recognition(Strict):
    # The shared language files (languages/<code>.yaml) whose ConText lexicon, answers, abbreviations and typo
    # settings this policy reads orders with; a section written below replaces theirs.
    languages: Annotated[
        list[Annotated[str, Field(pattern=r"^[a-z]{2}$")]],
        Field(
            description="Language files the policy uses, e.g. [en, es]; a context, terminators, questions, "
            "abbreviations or typos section written in the policy replaces the languages' one"
        ),
    ] = Field(default_factory=lambda: ["en"])
    code_systems: Annotated[dict[str, Annotated[list[str], Field(min_length=1)]], Field(min_length=1)]
    places: dict[EvidenceKind, list[Place]]
    # The order's own fields, read together: a combination's words may be split over them.
    order_fields: list[Place]
    billing_codes: dict[str, dict[str, str | BillingCodeSpec]] = Field(default_factory=dict)
    techniques: list[TechniqueSpec] = Field(default_factory=list)
    anatomy: AnatomySpec
    other_anatomy: OtherAnatomySpec = Field(default_factory=OtherAnatomySpec)
    look_alikes: list[LookAlikeSpec] = Field(default_factory=list)
    context: list[ContextSpec] = Field(default_factory=list)
    terminators: Terms = Field(default_factory=list)
    # Which evidence the context triggers and order questions qualify (the rest is always read as asserted).
    context_kinds: list[EvidenceKind] = Field(default_factory=lambda: list(_CONTEXT_KINDS))
    questions: QuestionsSpec | None = None
    # Abbreviations read as the word they stand for ("motn" -> "motion"), like a corrected typo.
    abbreviations: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9]+$")], Annotated[str, Field(pattern=r"^[a-z0-9 ]+$")]
    ] = Field(default_factory=dict)
    typos: TyposSpec | None = None
    # Concept classes by name, and the techniques composed of them (engine.compose; docs/policy-concepts.md).
    concepts: dict[ConceptName, ConceptSpec] = Field(default_factory=dict)
    compositions: list[CompositionSpec] = Field(default_factory=list)


class Condition(Strict):
    """A test over an order: one evidence test or order fact (a leaf), or all / any / unless of other conditions."""

    evidence: EvidenceKind | None = None
    in_: Annotated[list[Place] | None, Field(alias="in")] = None
    assertion: list[Assertion] | None = None
    group: Annotated[
        list[str] | None, Field(description="Only evidence of these groups (technique, look-alike ...)")
    ] = None
    status: list[str] | None = None
    intent: list[str] | None = None
    do_not_perform: bool | None = None
    condition: Annotated[str | None, Field(description="A named condition from `conditions:`")] = None
    rule: Annotated[str | None, Field(description="The `when:` of the rule with this id holds")] = None
    all: list[Condition] | None = None
    any: list[Condition] | None = None
    unless: list[Condition] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Condition:
        leaves = [
            name
            for name in ("evidence", "status", "intent", "do_not_perform", "condition", "rule")
            if getattr(self, name) is not None
        ]
        groups = [name for name in ("all", "any", "unless") if getattr(self, name) is not None]
        if len(leaves) > 1:
            raise ValueError(f"one test per condition, not {' and '.join(leaves)}; combine tests with all:")
        if leaves and groups:
            raise ValueError(f"a condition is either a test ({leaves[0]}) or a group ({groups[0]}), not both")
        if not leaves and not groups:
            raise ValueError("an empty condition; write a test (evidence, status, ...) or all / any / unless")
        if (self.in_ is not None or self.assertion is not None or self.group is not None) and self.evidence is None:
            raise ValueError("`in`, `assertion` and `group` refine an `evidence` test")
        return self


class Rule(Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
    when: Annotated[Condition | None, Field(description="Omit for the last rule, which always holds")] = None
    verdict: Judgement
    reason: Annotated[
        str, Field(min_length=1, description="Placeholders: {status}, {intent}, {deciding} and evidence kinds")
    ]
    # A not-flagged rule that decides orders which came close (a technique without the spine, a look-alike beside a
    # technique): a miss raises no card, so the report lists these orders for the analyst ("possible misses").
    review: Annotated[
        bool, Field(description="List the orders this not-flagged rule decides as possible misses in the report")
    ] = False


class PolicyFile(Strict):
    """One policy file in policies/."""

    schema_: Annotated[str | None, Field(alias="$schema")] = None
    policy: PolicyMeta
    payer: Payer
    services: Services
    prefetch: dict[str, PrefetchSpec] = Field(default_factory=dict)
    card: CardSpec
    coverage: CoverageSpec
    alternatives: Alternatives
    recognition: Recognition
    conditions: dict[str, Condition] = Field(default_factory=dict)
    decision: Annotated[list[Rule], Field(min_length=1)]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the policy format, for editors (yaml-language-server) and reviewers."""
    schema = PolicyFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cds-service policy file"
    return schema
