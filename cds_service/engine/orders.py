"""Read draft orders: find the ServiceRequests in a hook's Bundle and the places where each carries meaning."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import orjson

from .policy.schema import PLACES, Place
from .terms import fold

Shape = Literal["element", "detail", "annotation", "instruction"]


@dataclass(frozen=True)
class FhirField:
    """One element of a ServiceRequest the engine reads for meaning, the place its words count as, and its shape:
    "element" is any of CodeableConcept, CodeableReference (R5), Reference (its display) or a bare string; the
    others are orderDetail (R4 CodeableConcept / R5 parameters), Annotation and patientInstruction (R4 string / R5
    list). `repeats` is FHIR's cardinality (tolerant reading turns one value into an array and back)."""

    name: str
    place: Place
    shape: Shape = "element"
    repeats: bool = True


# Every element of a ServiceRequest (R4 and R5) whose words the engine reads, in reading order: tolerant reading,
# the first pass, evidence, the decision's places and explanations all use this one table. Adding a field is a line.
FIELDS: tuple[FhirField, ...] = (
    FhirField("code", "code", repeats=False),  # R4 CodeableConcept, R5 CodeableReference (concept or reference)
    FhirField("orderDetail", "detail", "detail"),
    FhirField("bodySite", "body_site"),
    FhirField("bodyStructure", "body_site", repeats=False),  # R5 Reference(BodyStructure)
    FhirField("reasonCode", "reason"),  # R4
    FhirField("reason", "reason"),  # R5 CodeableReference
    FhirField("reasonReference", "reason"),  # R4
    FhirField("note", "note", "annotation"),
    FhirField("supportingInfo", "supporting_info"),  # R4 Reference, R5 CodeableReference: a form, an answer
    FhirField("category", "category"),
    FhirField("performerType", "performer"),  # 0..1 in R4, but clients send several
    FhirField("performer", "performer"),  # Reference display: the organisation or clinic that does it
    FhirField("locationCode", "location"),  # R4
    FhirField("locationReference", "location"),  # R4
    FhirField("location", "location"),  # R5 CodeableReference
    FhirField("patientInstruction", "instruction", "instruction"),
)
# The request facts read beside the places (who and when are not read: ids, subject, dates).
FACT_FIELDS: tuple[str, ...] = ("status", "intent", "doNotPerform")
# Every element the verdict depends on: the first pass reads these, the verdict memo is keyed by them.
READ_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS) + FACT_FIELDS
# CRD 2.2 billing options on ServiceRequest.code: billing codes the client expects (billopt-3: consider them).
BILLING_OPTIONS = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-billing-options"
# A procedure code written as text in the order's name: "76496", "CPT 76496", "CPT#76496" (five digits alone).
_TEXT_CODE = re.compile(r"(?<![\w./-])(?:CPT[\s\u00ae#:-]*)?(\d{5})(?![\w./-])", re.IGNORECASE)
# A word of folded, lower-case text (the first pass and the evidence step read words alike).
WORD = re.compile(r"[a-z0-9]+")
# WORD as a byte table for ASCII text: letters lower-cased, digits kept, every other byte a space.
_WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 else 32 for c in range(256))
# JSON escapes for control characters would glue a letter to the next word ("\nDMX" -> "nDMX"): they become spaces.
_ESCAPE = re.compile(r"\\[bfnrt]")


class OrderWords(NamedTuple):
    """What the first pass reads of an order: the JSON of the elements the engine reads (also the key of the verdict
    cache: equal content, equal verdict), its text folded, and its words."""

    content: bytes
    text: str
    tokens: frozenset[str]


def order_words(resource: dict[str, Any]) -> OrderWords:
    """Every word of the order's elements the engine reads, keys included (no key is a word the policy needs): lower
    case, no accents. One orjson dump and one token pass, both in C."""
    content = orjson.dumps(list(map(resource.get, READ_FIELDS)))
    if content.isascii() and b"\\" not in content:
        # Most orders: plain ASCII without escapes, where folding changes nothing and a byte table finds the same
        # words as WORD (letters and digits, lower case) at a third of the regex's cost (bench/README.md).
        return OrderWords(content, content.decode(), frozenset(content.translate(_WORD_BYTES).decode().split()))
    text = content.decode()
    if "\\" in text:
        text = _ESCAPE.sub(" ", text)
    text = fold(text)
    return OrderWords(content, text, frozenset(WORD.findall(text.lower())))


__all__ = [
    "FIELDS",
    "PLACES",
    "READ_FIELDS",
    "Answer",
    "CodingRef",
    "FhirField",
    "OrderView",
    "Place",
    "as_list",
    "iter_bundle_resources",
    "read_order",
]

# Half-written orders can be anything; bound the work a hostile one can cause.
_MAX_ITEMS = 200
_MAX_TEXT = 4000
_MAX_DEPTH = 8
# An order question written as text: "Motion study requested? No", "Technique: dynamic fluoroscopic",
# "Motion study (DMX)?: No - static films only", "Q: Add cine sequence? A: Deferred". A "?" ends the question (what
# comes before it, a form's "Q:" or "Intake form:" included, is the question); without one, the first ":" does.
_ASKED = re.compile(r"\s*(?P<q>[^?\n]{2,160}?)\s*\?\s*:?\s*(?:A\s*[:.)-]\s*)?(?P<a>\S.*)", re.DOTALL | re.IGNORECASE)
_QUESTION = re.compile(r"\s*(?P<q>[^?:\n]{2,160}?)\s*(?:\?\s*:?|:)\s*(?P<a>\S.*)", re.DOTALL)
# A form's "Q: ... A: ..." without a question mark: "Q: DMX requested A: Withdrawn".
_QA = re.compile(r"\s*(?P<q>Q\s*[:.)]\s*\S.{0,160}?)\s+A\s*[:.)]\s*(?P<a>\S.*)", re.DOTALL | re.IGNORECASE)
# A form's item with its answer after a dash: "Perform motion analysis - Declined" (the last, short tail).
_DASHED = re.compile(r"\s*(?P<q>\S.{1,160}?)\s+[-\u2013\u2014]\s+(?P<a>\S(?:(?!\s[-\u2013\u2014]\s)[^?\n]){0,40})")
# Where an order question can be written: a form's answers (order detail, an attached questionnaire answer) may use
# "Question: answer"; a note, an instruction or a reason only asks with a "?" ("DMX cervical: no contrast" there is
# no answered question). The order's name is no question.
_FORM_PLACES: frozenset[str] = frozenset({"detail", "supporting_info"})
_ASKING_PLACES: frozenset[str] = frozenset({"note", "instruction", "reason"})


@dataclass(frozen=True)
class CodingRef:
    """A coding as the order wrote it, with where it was found."""

    place: Place
    system: str
    code: str
    display: str


@dataclass(frozen=True)
class Answer:
    """An order question's answer: the question is the first `question_end` characters of its text; the answer is
    the text after it or, for an R5 valueBoolean, the boolean."""

    question_end: int
    value: str | bool
    # Set off by a dash only ("Perform VMA - Declined"): an answer only when the whole tail is one ("No"), or it
    # opens with a refusal or deferral; "DMX cervical - no contrast" is no answered question.
    loose: bool = False


@dataclass(frozen=True)
class Places:
    """What an order says, read once from its fields (FIELDS): codings and texts with the place each came from."""

    codings: tuple[CodingRef, ...] = ()
    texts: tuple[tuple[Place, str], ...] = ()
    # Texts that are an order question with its answer, by their index in `texts`.
    answers: Mapping[int, Answer] = field(default_factory=dict)
    # Texts that are only a coding's display, by their index in `texts`: the coding they name.
    displays: Mapping[int, CodingRef] = field(default_factory=dict)


@dataclass(frozen=True, init=False)
class OrderView:
    """One draft order, parsed once and never changed: its request facts, the words the first pass reads (also the
    verdict memo's key) and, read on first use, its places. Every policy judges the same OrderView."""

    resource: dict[str, Any]
    id: str | None
    status: str | None
    intent: str | None
    shape: Literal["R4", "R5"]
    do_not_perform: bool
    # What the first pass reads (and the verdict memo's key): computed once when parsed, shared by every policy.
    words: OrderWords
    # The client's own resource, unchanged (CRD echoes it back); `resource` is the fixed copy that is read.
    original: dict[str, Any] | None = None

    def __init__(  # the dataclass's fields, in order
        self,
        resource: dict[str, Any],
        id: str | None,
        status: str | None,
        intent: str | None,
        shape: Literal["R4", "R5"],
        do_not_perform: bool,
        words: OrderWords,
        original: dict[str, Any] | None = None,
    ) -> None:
        # Every draft order of every call is built here: filling the instance's dict directly costs a third of the
        # frozen dataclass's setattr per field (bench/README.md, issue 23). Assigning a field later still raises.
        fields = self.__dict__
        fields["resource"] = resource
        fields["id"] = id
        fields["status"] = status
        fields["intent"] = intent
        fields["shape"] = shape
        fields["do_not_perform"] = do_not_perform
        fields["words"] = words
        fields["original"] = original

    @functools.cached_property
    def places(self) -> Places:
        return _read_places(self.resource)

    def share_places(self, other: OrderView) -> None:
        """Equal content reads to equal places: take another order's, if it has read them (the memo's hit)."""
        if "places" in other.__dict__ and "places" not in self.__dict__:
            self.__dict__["places"] = other.__dict__["places"]

    @property
    def codings(self) -> tuple[CodingRef, ...]:
        return self.places.codings

    @property
    def texts(self) -> tuple[tuple[Place, str], ...]:
        return self.places.texts

    @property
    def answers(self) -> Mapping[int, Answer]:
        return self.places.answers

    @property
    def displays(self) -> Mapping[int, CodingRef]:
        return self.places.displays

    @property
    def echo(self) -> dict[str, Any]:
        return self.original if self.original is not None else self.resource

    @property
    def reference(self) -> str | None:
        # An Appointment judged as the order it books is referred to as what it is.
        kind = self.echo.get("resourceType")
        return f"{kind if isinstance(kind, str) and kind else 'ServiceRequest'}/{self.id}" if self.id else None

    def label(self) -> str:
        """A short human name for the order: its code text, else its first coding display."""
        code = self.resource.get("code")
        if isinstance(code, dict):
            inner = code.get("concept")
            concept: dict[str, Any] = inner if isinstance(inner, dict) else code
            text = _str(concept.get("text"))
            if text:
                return text
        for place, text in self.texts:
            if place == "code":
                return text
        return "the order"


def as_list(value: Any) -> list[Any]:
    """Real clients put an object where an array belongs; read it as a one-item array rather than fail."""
    if isinstance(value, list):
        return value[:_MAX_ITEMS]
    if isinstance(value, dict):
        return [value]
    return []


def _concept_text(concept: Any) -> str | None:
    """A CodeableConcept in words: its text, else its first display (else a bare string sent in its place)."""
    if isinstance(concept, str):
        return _str(concept)
    if not isinstance(concept, dict):
        return None
    text = _str(concept.get("text"))
    if text:
        return text.strip()
    for coding in as_list(concept.get("coding")):
        if isinstance(coding, dict) and _str(coding.get("display")):
            return str(coding["display"]).strip()
    return None


def _written_question(text: str, place: Place) -> Answer | None:
    """ "Motion study requested? No" -> the question ends after "requested"; the answer is "No"."""
    asked = _ASKED.fullmatch(text) or _QA.fullmatch(text)
    if asked is not None and any(c.isalpha() for c in asked["q"]):
        return Answer(asked.end("q"), asked["a"].strip())
    if place not in _FORM_PLACES:
        return None
    dashed = _DASHED.fullmatch(text)
    if dashed is not None and any(c.isalpha() for c in dashed["q"]) and any(c.isalpha() for c in dashed["a"]):
        return Answer(dashed.end("q"), dashed["a"].strip(), loose=True)
    match = _QUESTION.fullmatch(text)
    if match is None or not any(c.isalpha() for c in match["q"]):
        stripped = text.rstrip()
        # A question with no answer ("Motion study (DMX)?") asks; it does not order.
        return Answer(len(stripped), "") if stripped.endswith("?") and len(stripped) > 1 else None
    return Answer(match.end("q"), match["a"].strip())


def _str(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value[:_MAX_TEXT]
    return None


def iter_bundle_resources(bundle: Any) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(resource, fullUrl) for each entry of a Bundle that holds a resource object."""
    if not isinstance(bundle, dict):
        return
    for entry in as_list(bundle.get("entry")):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            full_url = entry.get("fullUrl")
            yield entry["resource"], full_url if isinstance(full_url, str) else None


def _shape(resource: dict[str, Any]) -> Literal["R4", "R5"]:
    # R5 turned code into a CodeableReference (code.concept) and reasonCode/reasonReference into reason[].
    code = resource.get("code")
    if isinstance(code, dict) and ("concept" in code or "reference" in code):
        return "R5"
    if "reason" in resource or isinstance(resource.get("patientInstruction"), list):
        return "R5"
    return "R4"


class _Reader:
    """Collects codings and texts from the shapes FHIR uses, tolerating whatever a sloppy client sends."""

    def __init__(self) -> None:
        self.codings: list[CodingRef] = []
        self.texts: list[tuple[Place, str]] = []
        self.answers: dict[int, Answer] = {}
        self.displays: dict[int, CodingRef] = {}

    def places(self) -> Places:
        return Places(tuple(self.codings), tuple(self.texts), self.answers, self.displays)

    def field(self, spec: FhirField, value: Any) -> None:
        if spec.shape == "detail":
            self.order_detail(value)
        elif spec.shape == "annotation":
            for note in as_list(value):
                self.text(spec.place, note.get("text") if isinstance(note, dict) else note)
        elif spec.shape == "instruction":
            if isinstance(value, str):
                self.text(spec.place, value)
            else:
                self.strings_under(spec.place, as_list(value))
        else:
            for item in as_list(value) if spec.repeats else [value]:
                self.element(spec.place, item)

    def text(self, place: Place, value: Any, answer: Answer | None = None) -> None:
        text = _str(value)
        if text and not text.isascii():
            text = unicodedata.normalize("NFC", text)  # offsets found later refer to this form
        # code.text often repeats the coding's display: read each text once per place.
        if text and (place, text) not in self.texts:
            if answer is None and (place in _FORM_PLACES or place in _ASKING_PLACES):
                answer = _written_question(text, place)
            if answer is not None:
                self.answers[len(self.texts)] = answer
            self.texts.append((place, text))
            if place == "code":
                self.text_codes(place, text)

    def text_codes(self, place: Place, text: str) -> None:
        """A procedure code written in the order's name ("CPT 76496 lumbar") is a coding without a system: the
        policy reads it as its code when exactly one of its systems lists it."""
        known = {c.code for c in self.codings}
        for match in _TEXT_CODE.finditer(text):
            if match[1] not in known:
                known.add(match[1])
                self.codings.append(CodingRef(place, "", match[1], ""))

    def order_detail(self, details: Any) -> None:
        """R4: CodeableConcepts (a question may be written "Question? Answer"). R5: parameters, each a question
        (`code`) with its answer (`value[x]`), read as one text "Question: answer" so a trigger in the question
        ("Prior study: DMX 2024") reaches the answer."""
        for detail in as_list(details):
            parameters = detail.get("parameter") if isinstance(detail, dict) else None
            if parameters is None:
                self.strings_under("detail", detail)
                continue
            for parameter in as_list(parameters):
                if isinstance(parameter, dict):
                    self.parameter(parameter)

    def parameter(self, parameter: dict[str, Any]) -> None:
        code = parameter.get("code")
        question = _concept_text(code) or ""
        if isinstance(code, dict):
            for coding in as_list(code.get("coding")):
                self.coding("detail", coding, read_display=False)
        value = parameter.get("valueBoolean")
        if isinstance(value, bool) and question:
            self.text("detail", question, Answer(len(question), value))
            return
        answer = parameter.get("valueString")
        concept = parameter.get("valueCodeableConcept")
        if isinstance(concept, dict):
            for coding in as_list(concept.get("coding")):
                self.coding("detail", coding, read_display=False)
            answer = _concept_text(concept)
        if isinstance(answer, str) and answer.strip():
            if question:
                value = answer.strip()
                # A value that is itself a question with its answer ("Order comment" = "DMX? - N") answers that.
                inner = _ASKED.fullmatch(value)
                if inner is not None and any(c.isalpha() for c in inner["q"]):
                    asked = Answer(len(question) + 2 + inner.end("q"), inner["a"].strip())
                    self.text("detail", f"{question}: {value}", asked)
                else:
                    self.text("detail", f"{question}: {value}", Answer(len(question), value))
            else:
                self.text("detail", answer)
        elif question:
            self.text("detail", question)

    def element(self, place: Place, value: Any, depth: int = 0) -> None:
        """A CodeableConcept (codings, then text), an R5 CodeableReference (its concept, then its reference's
        display), a Reference (its display) or a bare string sent in their place; CRD billing options on it."""
        if not isinstance(value, dict):
            self.text(place, value)  # a plain string where a concept belongs still says what was ordered
            return
        if depth > 2:
            return
        for coding in as_list(value.get("coding")):
            self.coding(place, coding)
        self.text(place, value.get("text"))
        self.text(place, value.get("display"))
        for key in ("concept", "reference"):
            if isinstance(value.get(key), dict):
                self.element(place, value[key], depth + 1)
        for extension in as_list(value.get("extension")):
            if isinstance(extension, dict) and extension.get("url") == BILLING_OPTIONS:
                self.billing_options(place, extension)

    def billing_options(self, place: Place, extension: dict[str, Any], depth: int = 0) -> None:
        """Every coding under a CRD billing-options extension (sub-extensions or values): a code the client
        expects to bill, read as a coding of the order; its display is the code's descriptor, not order text."""
        if depth > _MAX_DEPTH:
            return
        for key, value in extension.items():
            if key == "valueCoding":
                self.coding(place, value, read_display=False)
            elif key == "valueCodeableConcept" and isinstance(value, dict):
                for coding in as_list(value.get("coding")):
                    self.coding(place, coding, read_display=False)
            elif key == "extension":
                for inner in as_list(value):
                    if isinstance(inner, dict):
                        self.billing_options(place, inner, depth + 1)

    def coding(self, place: Place, coding: Any, *, read_display: bool = True) -> None:
        if not isinstance(coding, dict):
            return
        system = coding.get("system")
        code = coding.get("code")
        display = _str(coding.get("display")) or ""
        if isinstance(code, int | float) and not isinstance(code, bool):
            code = str(code)  # a number where a code string belongs: still the code the clinician picked
        system = system.strip() if isinstance(system, str) else ""
        if isinstance(code, str) and "^" in code:
            # An HL7 v2 coded element copied whole ("76499^DIGITAL MOTION XRAY^CPT"): its code, its text, and a
            # v2 coding-system name rather than a URI, so the policy reads the code as it reads one without a system.
            parts = code.split("^")
            code, display, system = parts[0], display or _str(parts[1] if len(parts) > 1 else "") or "", ""
        ref = None
        if isinstance(code, str) and code.strip():
            ref = CodingRef(place, system, code.strip()[:64], display)
            self.codings.append(ref)
        if display and read_display:
            before = len(self.texts)
            self.text(place, display)
            if ref is not None and len(self.texts) > before:
                self.displays[before] = ref

    def strings_under(self, place: Place, value: Any, depth: int = 0) -> None:
        """Every text, display and string value under an element whose shape differs by version (orderDetail)."""
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("text", "display", "valueString", "instructionMarkdown") and isinstance(item, str):
                    self.text(place, item)
                elif isinstance(item, dict | list):
                    self.strings_under(place, item, depth + 1)
        elif isinstance(value, list):
            for item in value[:_MAX_ITEMS]:
                self.strings_under(place, item, depth + 1)
        elif depth == 0:
            self.text(place, value)


def _read_places(resource: dict[str, Any]) -> Places:
    read = _Reader()
    for spec in FIELDS:
        value = resource.get(spec.name)
        if value is not None:
            read.field(spec, value)
    return read.places()


def read_order(resource: dict[str, Any], original: dict[str, Any] | None = None) -> OrderView:
    """Parse one ServiceRequest (R4 or R5 shape) once: its request facts now, its places on first use.
    `original` is the client's resource when `resource` is the tolerant reader's fixed copy."""
    rid = resource.get("id")
    status = resource.get("status")
    intent = resource.get("intent")
    return OrderView(
        resource=resource,
        id=rid.strip() if isinstance(rid, str) and rid.strip() else None,
        status=status.strip() if isinstance(status, str) else None,
        intent=intent.strip() if isinstance(intent, str) else None,
        shape=_shape(resource),
        do_not_perform=resource.get("doNotPerform") is True,
        words=order_words(resource),
        original=original,
    )
