"""Read draft orders: find the ServiceRequests in a hook's Bundle and the places where each carries meaning."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .policy.schema import PLACES, Place

# Every element of a ServiceRequest the engine reads: its verdict depends on these and nothing else (ids, subject,
# dates and the rest say who and when, not what).
READ_FIELDS: tuple[str, ...] = (
    "code",
    "orderDetail",
    "bodySite",
    "bodyStructure",
    "reasonCode",
    "reason",
    "reasonReference",
    "note",
    "category",
    "performerType",
    "patientInstruction",
    "status",
    "intent",
    "doNotPerform",
)

__all__ = ["PLACES", "Answer", "CodingRef", "OrderView", "Place", "as_list", "iter_bundle_resources", "read_order"]

# Half-written orders can be anything; bound the work a hostile one can cause.
_MAX_ITEMS = 200
_MAX_TEXT = 4000
_MAX_DEPTH = 8
# An order question written as text: "Motion study requested? No", "Technique: dynamic fluoroscopic",
# "Motion study (DMX)?: No - static films only". The question ends at the first "?" or ":".
_QUESTION = re.compile(r"\s*(?P<q>[^?:\n]{2,160}?)\s*(?:\?\s*:?|:)\s*(?P<a>\S.*)", re.DOTALL)


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


@dataclass
class OrderView:
    """What the matcher needs from one ServiceRequest, read without validating the whole resource."""

    resource: dict[str, Any]
    id: str | None
    status: str | None
    intent: str | None
    shape: Literal["R4", "R5"]
    do_not_perform: bool
    codings: list[CodingRef] = field(default_factory=list)
    texts: list[tuple[Place, str]] = field(default_factory=list)
    # Texts that are an order question with its answer, by their index in `texts`.
    answers: dict[int, Answer] = field(default_factory=dict)
    # Texts that are only a coding's display, by their index in `texts`: the coding they name.
    displays: dict[int, CodingRef] = field(default_factory=dict)

    @property
    def reference(self) -> str | None:
        # An Appointment judged as the order it books is referred to as what it is.
        kind = self.resource.get("resourceType")
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


def _written_question(text: str) -> Answer | None:
    """ "Motion study requested? No" -> the question ends after "requested"; the answer is "No"."""
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

    def __init__(self, view: OrderView) -> None:
        self.view = view

    def text(self, place: Place, value: Any, answer: Answer | None = None) -> None:
        text = _str(value)
        if text and not text.isascii():
            text = unicodedata.normalize("NFC", text)  # offsets found later refer to this form
        # code.text often repeats the coding's display: read each text once per place.
        if text and (place, text) not in self.view.texts:
            if answer is None and place == "detail":
                answer = _written_question(text)
            if answer is not None:
                self.view.answers[len(self.view.texts)] = answer
            self.view.texts.append((place, text))

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
                self.text("detail", f"{question}: {answer.strip()}", Answer(len(question), answer.strip()))
            else:
                self.text("detail", answer)
        elif question:
            self.text("detail", question)

    def concept(self, place: Place, concept: Any) -> None:
        """A CodeableConcept: its codings and its text."""
        if not isinstance(concept, dict):
            self.text(place, concept)
            return
        for coding in as_list(concept.get("coding")):
            self.coding(place, coding)
        self.text(place, concept.get("text"))

    def coding(self, place: Place, coding: Any, *, read_display: bool = True) -> None:
        if not isinstance(coding, dict):
            return
        system = coding.get("system")
        code = coding.get("code")
        display = _str(coding.get("display")) or ""
        if isinstance(code, int | float) and not isinstance(code, bool):
            code = str(code)  # a number where a code string belongs: still the code the clinician picked
        ref = None
        if isinstance(code, str) and code.strip():
            ref = CodingRef(place, system.strip() if isinstance(system, str) else "", code.strip()[:64], display)
            self.view.codings.append(ref)
        if display and read_display:
            before = len(self.view.texts)
            self.text(place, display)
            if ref is not None and len(self.view.texts) > before:
                self.view.displays[before] = ref

    def reference_display(self, place: Place, reference: Any) -> None:
        if isinstance(reference, dict):
            self.text(place, reference.get("display"))

    def codeable_reference(self, place: Place, value: Any) -> None:
        """R5 CodeableReference, or an R4 CodeableConcept sent where R5 expects one (or bare text, sloppily)."""
        if not isinstance(value, dict):
            self.text(place, value)  # a plain string where a concept belongs still says what was ordered
            return
        if "concept" in value or "reference" in value:
            self.concept(place, value.get("concept"))
            self.reference_display(place, value.get("reference"))
        else:
            self.concept(place, value)

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


def glance(resource: dict[str, Any]) -> OrderView:
    """The order's identity and request facts only (id, status, intent, doNotPerform), for an order the first pass
    found nothing in: its places are not read."""
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
    )


def read_order(resource: dict[str, Any]) -> OrderView:
    """Read one ServiceRequest (R4 or R5 shape) into the places the policy rules look at."""
    view = glance(resource)
    read = _Reader(view)
    read.codeable_reference("code", resource.get("code"))
    read.order_detail(resource.get("orderDetail"))
    for site in as_list(resource.get("bodySite")):
        read.concept("body_site", site)
    read.reference_display("body_site", resource.get("bodyStructure"))
    for reason in as_list(resource.get("reasonCode")):
        read.concept("reason", reason)
    for reason in as_list(resource.get("reason")):
        read.codeable_reference("reason", reason)
    for reason in as_list(resource.get("reasonReference")):
        read.reference_display("reason", reason)
    for note in as_list(resource.get("note")):
        if isinstance(note, dict):
            read.text("note", note.get("text"))
    for category in as_list(resource.get("category")):
        read.concept("category", category)
    for performer in as_list(resource.get("performerType")):
        read.concept("performer", performer)
    instruction = resource.get("patientInstruction")
    if isinstance(instruction, str):
        read.text("instruction", instruction)
    else:
        read.strings_under("instruction", as_list(instruction))
    return view
