"""Read draft orders: find the ServiceRequests in a hook's Bundle and the places where each carries meaning."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .policy.schema import PLACES, Place

__all__ = ["PLACES", "CodingRef", "OrderView", "Place", "as_list", "iter_bundle_resources", "read_order"]

# Half-written orders can be anything; bound the work a hostile one can cause.
_MAX_ITEMS = 200
_MAX_TEXT = 4000
_MAX_DEPTH = 8


@dataclass(frozen=True)
class CodingRef:
    """A coding as the order wrote it, with where it was found."""

    place: Place
    system: str
    code: str
    display: str


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

    @property
    def reference(self) -> str | None:
        return f"ServiceRequest/{self.id}" if self.id else None

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

    def text(self, place: Place, value: Any) -> None:
        text = _str(value)
        # code.text often repeats the coding's display: read each text once per place.
        if text and (place, text) not in self.view.texts:
            self.view.texts.append((place, text))

    def concept(self, place: Place, concept: Any) -> None:
        """A CodeableConcept: its codings and its text."""
        if not isinstance(concept, dict):
            self.text(place, concept)
            return
        for coding in as_list(concept.get("coding")):
            if not isinstance(coding, dict):
                continue
            system = coding.get("system")
            code = coding.get("code")
            display = _str(coding.get("display")) or ""
            if isinstance(code, int | float) and not isinstance(code, bool):
                code = str(code)  # a number where a code string belongs: still the code the clinician picked
            if isinstance(code, str) and code.strip():
                self.view.codings.append(
                    CodingRef(place, system.strip() if isinstance(system, str) else "", code.strip()[:64], display)
                )
            if display:
                self.text(place, display)
        self.text(place, concept.get("text"))

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


def read_order(resource: dict[str, Any]) -> OrderView:
    """Read one ServiceRequest (R4 or R5 shape) into the places the policy rules look at."""
    rid = resource.get("id")
    status = resource.get("status")
    intent = resource.get("intent")
    view = OrderView(
        resource=resource,
        id=rid.strip() if isinstance(rid, str) and rid.strip() else None,
        status=status.strip() if isinstance(status, str) else None,
        intent=intent.strip() if isinstance(intent, str) else None,
        shape=_shape(resource),
        do_not_perform=resource.get("doNotPerform") is True,
    )
    read = _Reader(view)
    read.codeable_reference("code", resource.get("code"))
    read.strings_under("detail", resource.get("orderDetail"))
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
