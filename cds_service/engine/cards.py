"""The CDS Hooks cards for a flagged order, one CRD card type each: alternative, external reference, instructions."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from .decision import Verdict
from .explain import explain_lines
from .fhir_shapes import is_codeable_concept, is_codeable_reference, is_reference
from .markdown import MAX_DETAIL_WORDS, md, shorten, word_count
from .memo import Memo
from .orders import as_list
from .outcome import CardKind, CardOutcome, SuggestionOutcome
from .policy.model import Alternative, Coding, Policy
from .request import HookRequest

# FHIR ServiceRequest category example value set: SNOMED CT 363679005 "Imaging".
_IMAGING = {"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}
_INTENTS = frozenset(
    {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
_PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})
# Fixed namespace so the replacement order for a given draft keeps the same id across calls (idempotent for EHRs).
_ALTERNATIVE_NS = uuid.UUID("6f1c1a52-8f0e-4c56-9a51-7d0f3e0b2c44")
# CRD card types: CodeSystem temp in CRD 2.0.1, HL7 terminology's cdshooks-card-type (same codes) from 2.2 on.
CRD_TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
CDSHOOKS_CARD_TYPE = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
# The order's name as the card's first words: long catalog names are cut so the detail stays scannable.
_NAME_WORDS = 12
_REQUESTERS = ("Practitioner", "PractitionerRole")


def order_name(verdict: Verdict) -> str:
    return " ".join(verdict.order.label().split())[:200]


def topic(coding: Coding, crd_version: str) -> dict[str, str]:
    """The card's source.topic in the CRD version the client asked for (davinci-crd.requestedVersion)."""
    out = coding.to_fhir()
    if crd_version != "2.0" and coding.system == CRD_TEMP:
        out["system"] = CDSHOOKS_CARD_TYPE
    return out


class CardMaker:
    """Builds the cards of one call: the uuid source is injectable, so cards carry ids the service can recognise."""

    def __init__(self, request: HookRequest, today: date, crd_version: str = "2.0", new_uuid: Any = None) -> None:
        self.request = request
        self.today = today
        self.crd_version = crd_version
        self.new_uuid = new_uuid or (lambda: str(uuid.uuid4()))

    def alternative_card(self, verdict: Verdict) -> CardOutcome | None:
        """The Propose Alternate Request card, when a covered alternative can be proposed for this order.

        CRD cards.html#propose-alternate-request: a suggestion holds "a 'delete' action for the current proposed
        order and a 'create' action for the new proposed order"; the kit (suggestion_actions_validation.rb,
        delete_action_check) fails a card on which a delete has no create beside it, and CRD 2.2's
        CRDCDSHooksAlternateResponse allows exactly one suggestion with exactly those two actions and no links.
        So the card has that one suggestion, and its detail links to the policy instead of Card.links.
        """
        order = verdict.order
        alternative = verdict.policy.alternatives.get(verdict.region or "")
        # A booked Appointment is not an order to delete and replace: it gets the External Reference card.
        if not order.reference or not order.reference.startswith("ServiceRequest/") or alternative is None:
            return None
        resource = alternative_order(verdict, alternative, self.request, self.today)
        if resource is None:
            return None
        text = verdict.policy.card
        suggestion_uuid = self.new_uuid()
        suggestion = {
            "label": alternative.suggestion_label,
            "uuid": suggestion_uuid,
            "isRecommended": True,
            "actions": [
                {"type": "delete", "description": text.alternative_remove, "resourceId": order.reference},
                {
                    "type": "create",
                    "description": f"{text.alternative_description}: {alternative.label}",
                    "resource": resource,
                },
            ],
        }
        outcome = SuggestionOutcome(suggestion_uuid, alternative.suggestion_label, "replace", ("delete", "create"))
        card = self._card(verdict, text.alternative_topic, alternative.instead, suggestions=[suggestion])
        return self._outcome(verdict, "alternative", text.alternative_topic, card, (outcome,))

    def guideline_card(self, verdict: Verdict) -> CardOutcome:
        """The External Reference card: the policy's links (absolute), no suggestions.

        CRD cards.html#external-reference: "The card SHALL have at least one Card.link. The Link.type SHALL have a
        type of absolute"; CRD 2.2's CRDCDSHooksExternalRefResponse: suggestions 0..0, selectionBehavior 0..0.
        """
        text = verdict.policy.card
        links = [{"label": link.label, "url": link.url, "type": "absolute"} for link in text.links]
        card = self._card(verdict, text.guideline_topic, text.guideline_instead, links=links)
        return self._outcome(verdict, "guideline", text.guideline_topic, card, ())

    def instructions_card(self, verdict: Verdict) -> CardOutcome | None:
        """The Instructions card: text only (CRD cards.html#instructions-response-type; the kit's
        instructions_response_type? and CRD 2.2's CRDCDSHooksInstructionsResponse: no links, no suggestions)."""
        text = verdict.policy.card
        if not (text.instructions_topic and text.instructions_summary and text.instructions_detail):
            return None
        card_uuid = self.new_uuid()
        name = md(shorten(order_name(verdict), _NAME_WORDS))
        card: dict[str, Any] = {
            "uuid": card_uuid,
            "summary": text.instructions_summary,
            # CRD cards.html: reimbursement consequences are at most a warning; this card only informs.
            "indicator": "info",
            "detail": f"**{name}**\n\n{text.instructions_detail}",
            "source": self._source(verdict, text.instructions_topic),
        }
        self._associate(verdict, card)
        return self._outcome(verdict, "instructions", text.instructions_topic, card, (), card_uuid=card_uuid)

    # -- the parts every card shares ----------------------------------------------------------------------------
    def _source(self, verdict: Verdict, coding: Coding) -> dict[str, Any]:
        policy = verdict.policy
        return {"label": policy.payer, "url": policy.url, "topic": topic(coding, self.crd_version)}

    def _card(
        self,
        verdict: Verdict,
        coding: Coding,
        instead: str,
        *,
        suggestions: list[dict[str, Any]] | None = None,
        links: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """A card with either suggestions or links, never both: CRD 2.2 tells its card types apart by them."""
        text = verdict.policy.card
        card: dict[str, Any] = {
            "uuid": self.new_uuid(),
            "summary": text.summary,
            "indicator": text.indicator,
            # Without Card.links the detail links to the policy (CRD cards.html allows links in Card.detail).
            "detail": detail(verdict, instead, links_in_detail=not links),
            "source": self._source(verdict, coding),
        }
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "at-most-one"
        card["overrideReasons"] = [reason.to_fhir() for reason in text.override_reasons]
        if links:
            card["links"] = links
        self._associate(verdict, card)
        return card

    @staticmethod
    def _associate(verdict: Verdict, card: dict[str, Any]) -> None:
        if verdict.order.reference:
            card["extension"] = {"davinci-crd.associated-resource": [{"reference": verdict.order.reference}]}

    @staticmethod
    def _outcome(
        verdict: Verdict,
        kind: CardKind,
        coding: Coding,
        card: dict[str, Any],
        suggestions: tuple[SuggestionOutcome, ...],
        card_uuid: str | None = None,
    ) -> CardOutcome:
        return CardOutcome(
            uuid=card_uuid or card["uuid"],
            kind=kind,
            policy=verdict.policy.id,
            rule=verdict.rule,
            order=verdict.order.reference,
            order_name=order_name(verdict),
            topic=coding.code,
            indicator=card["indicator"],
            suggestions=suggestions,
            json=card,
        )


# Card details by (policy, the order's read content, what to do, links in it): a verdict depends on nothing else
# (decision.judge's memo), so neither does its detail; EHRs send the same orderables call after call. Bounded.
_details: Memo[tuple[Policy, bytes, str, bool], str] = Memo(1024)


def detail(verdict: Verdict, instead: str, *, links_in_detail: bool) -> str:
    """The card's detail (`card_detail`), remembered for orders of the same content under the same policy."""
    key = (verdict.policy, verdict.order.words.content, instead, links_in_detail)
    known = _details.get(key)
    if known is not None:
        return known
    text = card_detail(verdict, instead, links_in_detail=links_in_detail)
    _details.put(key, text)
    return text


def card_detail(verdict: Verdict, instead: str, *, links_in_detail: bool) -> str:
    """What matched and what to do first, then the policy position and the evidence (CRD cards.html: "critical
    information being provided in the first paragraph"); at most MAX_DETAIL_WORDS words.

    The order is named by what was ordered, never by its id; the client's words are escaped (md).
    """
    text = verdict.policy.card
    name = md(shorten(order_name(verdict), _NAME_WORDS))
    why = "\n".join(f"- {md(line)}" for line in explain_lines(verdict))
    matched = f"**{name}** {text.matched}:\n{why}"
    todo = f"**What to do:** {instead}"
    links = " · ".join(f"[{link.detail}]({link.url})" for link in text.links if link.detail)
    tail = f" {links}." if links_in_detail and links else ""
    footer = f"*{text.footer}*"
    # The evidence sentence goes first when the order's own words leave no room, then the footer: what matched,
    # what to do and the policy position always stay.
    for parts in (
        [matched, todo, f"{text.position} {text.evidence}{tail}", footer],
        [matched, todo, f"{text.position}{tail}", footer],
        [matched, todo, f"{text.position}{tail}"],
    ):
        out = "\n\n".join(parts)
        if word_count(out) <= MAX_DETAIL_WORDS:
            return out
    return out


def _choice(value: Any, allowed: frozenset[str], default: str | None) -> str | None:
    """A client's code if it is one of ours; client JSON may hold a list or object there (unhashable)."""
    return value if isinstance(value, str) and value in allowed else default


def _reference(value: Any, kinds: tuple[str, ...]) -> dict[str, str] | None:
    """The client's reference when it is a relative one to one of `kinds` (the types the CRD profile allows)."""
    if isinstance(value, dict) and isinstance(value.get("reference"), str) and value["reference"].strip():
        target = value["reference"].strip()
        parts = target.split("/")
        if len(parts) < 2 or parts[-2] not in kinds:
            return None
        ref = {"reference": target}
        if isinstance(value.get("display"), str) and value["display"].strip():
            ref["display"] = value["display"].strip()
        return ref
    return None


def _context_reference(kind: tuple[str, ...], value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    if "/" in value:
        return {"reference": value} if value.split("/", 1)[0] in kind else None
    return {"reference": f"{kind[0]}/{value}"}


def alternative_order(
    verdict: Verdict, alternative: Alternative, request: HookRequest, today: date
) -> dict[str, Any] | None:
    """A complete draft ServiceRequest for the covered alternative, same patient, requester and encounter.

    CRD profile-servicerequest (on US Core ServiceRequest): status, intent, code, subject (a Patient), authoredOn
    and requester (a Practitioner or PractitionerRole) are required; without a subject or a requester no
    conformant replacement can be proposed. Built in the FHIR version the client used for the draft (R4 or R5).
    The parts built from the policy were checked when it loaded; what is copied from the client is checked here by
    the datatypes' structural rules, and left out when it breaks them.
    """
    original = verdict.order.echo
    shape = verdict.order.shape
    subject = _reference(original.get("subject"), ("Patient",)) or _context_reference(("Patient",), request.patient_id)
    requester = _reference(original.get("requester"), _REQUESTERS) or _context_reference(_REQUESTERS, request.user_id)
    if subject is None or not is_reference(subject) or requester is None or not is_reference(requester):
        return None
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": str(uuid.uuid5(_ALTERNATIVE_NS, f"{verdict.order.reference}|{alternative.region}")),
        "status": "draft",
        "intent": _choice(original.get("intent"), _INTENTS, "order"),
    }
    categories = [c for c in as_list(original.get("category")) if isinstance(c, dict)]
    resource["category"] = categories if categories and all(is_codeable_concept(c) for c in categories) else [_IMAGING]
    concept = {"coding": [alternative.code.to_fhir()], "text": alternative.code.display}
    resource["code"] = {"concept": concept} if shape == "R5" else concept
    priority = _choice(original.get("priority"), _PRIORITIES, None)
    if priority:
        resource["priority"] = priority
    resource["subject"] = subject
    encounter = _reference(original.get("encounter"), ("Encounter",)) or _context_reference(
        ("Encounter",), request.encounter_id
    )
    if encounter and is_reference(encounter):
        resource["encounter"] = encounter
    # The replacement is authored now, when the clinician accepts it (a FHIR date is a valid dateTime).
    resource["authoredOn"] = today.isoformat()
    resource["requester"] = requester
    reasons_key = "reason" if shape == "R5" else "reasonCode"
    reasons = [r for r in as_list(original.get(reasons_key)) if isinstance(r, dict)]
    valid = is_codeable_reference if shape == "R5" else is_codeable_concept
    if reasons and all(valid(r) for r in reasons):
        resource[reasons_key] = reasons
    resource["bodySite"] = [{"coding": [alternative.body_site.to_fhir()], "text": alternative.body_site.display}]
    # The note names the replaced order by what was ordered, as the clinician knows it (not by its id).
    note = verdict.policy.replacement_note.replace("{order}", shorten(order_name(verdict), _NAME_WORDS))
    resource["note"] = [{"text": note}]
    return resource
