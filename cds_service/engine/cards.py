"""Build the CDS Hooks card for a flagged order: warning, evidence, why it matched, and what to order instead."""

from __future__ import annotations

import re
import uuid
from typing import Any

from .decision import Verdict
from .explain import explain_lines
from .fhir_shapes import is_codeable_concept, is_codeable_reference, is_reference
from .orders import as_list
from .outcome import CardOutcome, SuggestionOutcome
from .policy.model import Alternative
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
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|!~])")


def md(text: str) -> str:
    """Client text shown as text: no markdown of the client's (links, images, HTML) renders in the EHR's card."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def order_name(verdict: Verdict) -> str:
    return " ".join(verdict.order.label().split())[:200]


def build_card(verdict: Verdict, request: HookRequest) -> CardOutcome:
    """One card for one flagged order (CDS Hooks 2.0 card; CRD associated-resource extension)."""
    policy = verdict.policy
    text = policy.card
    order = verdict.order
    card_uuid = str(uuid.uuid4())
    card: dict[str, Any] = {
        "uuid": card_uuid,
        "summary": text.summary,
        "indicator": text.indicator,
        "detail": _detail(verdict),
        "source": {"label": policy.payer, "url": policy.url, "topic": text.topic.to_fhir()},
    }
    suggestions = _suggestions(verdict, request)
    if suggestions:
        card["suggestions"] = [s for s, _ in suggestions]
        card["selectionBehavior"] = "at-most-one"
    card["overrideReasons"] = [reason.to_fhir() for reason in text.override_reasons]
    card["links"] = [{"label": label, "url": url, "type": "absolute"} for label, url in text.links]
    if order.reference:
        card["extension"] = {"davinci-crd.associated-resource": [{"reference": order.reference}]}
    return CardOutcome(
        uuid=card_uuid,
        kind="guideline",
        policy=policy.id,
        rule=verdict.rule,
        order=order.reference,
        order_name=order_name(verdict),
        topic=text.topic.code,
        indicator=text.indicator,
        suggestions=tuple(outcome for _, outcome in suggestions),
        json=card,
    )


def _detail(verdict: Verdict) -> str:
    policy = verdict.policy
    text = policy.card
    order = verdict.order
    heading = f"**Order:** {md(order_name(verdict))}" + (f" ({md(order.reference)})" if order.reference else "")
    why = "\n".join(f"- {md(line)}" for line in explain_lines(verdict))
    alternative = policy.alternatives.get(verdict.region or "")
    instead = text.instead
    if alternative:
        instead += f" Suggested here: {alternative.label}."
    return "\n\n".join(
        [
            heading,
            text.position,
            f"**Evidence:** {text.evidence}",
            f"**Why this order matched:**\n{why}",
            f"**What to do instead:** {instead}",
            f"*{text.footer}*",
        ]
    )


def _suggestions(verdict: Verdict, request: HookRequest) -> list[tuple[dict[str, Any], SuggestionOutcome]]:
    order = verdict.order
    if not order.reference:
        return []  # nothing to delete by id; the card still warns
    text = verdict.policy.card
    delete = {"type": "delete", "description": text.remove_description, "resourceId": order.reference}
    remove_uuid = str(uuid.uuid4())
    out = [
        (
            {"label": text.remove_label, "uuid": remove_uuid, "actions": [delete]},
            SuggestionOutcome(remove_uuid, text.remove_label, "remove", ("delete",)),
        )
    ]
    alternative = verdict.policy.alternatives.get(verdict.region or "")
    if alternative:
        resource = alternative_order(verdict, alternative, request)
        if resource is not None:
            replace_uuid = str(uuid.uuid4())
            suggestion: dict[str, Any] = {
                "label": alternative.suggestion_label,
                "uuid": replace_uuid,
                "isRecommended": True,
                "actions": [
                    dict(delete),
                    {
                        "type": "create",
                        "description": f"{text.replace_description}: {alternative.label}",
                        "resource": resource,
                    },
                ],
            }
            out.append(
                (
                    suggestion,
                    SuggestionOutcome(replace_uuid, alternative.suggestion_label, "replace", ("delete", "create")),
                )
            )
    return out


def _choice(value: Any, allowed: frozenset[str], default: str | None) -> str | None:
    """A client's code if it is one of ours; client JSON may hold a list or object there (unhashable)."""
    return value if isinstance(value, str) and value in allowed else default


def _reference(value: Any) -> dict[str, str] | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str) and value["reference"].strip():
        ref = {"reference": value["reference"].strip()}
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


def alternative_order(verdict: Verdict, alternative: Alternative, request: HookRequest) -> dict[str, Any] | None:
    """A complete draft ServiceRequest for the covered alternative, same patient, requester and encounter.

    Built in the FHIR version the client used for the draft (R4 or R5). The parts built from the policy were checked
    when it loaded; what is copied from the client is checked here by the datatypes' structural rules, and left out
    when it breaks them.
    """
    original = verdict.order.resource
    shape = verdict.order.shape
    subject = _reference(original.get("subject")) or _context_reference(("Patient",), request.patient_id)
    if subject is None or not is_reference(subject):
        return None  # a ServiceRequest needs a subject; without one the replacement cannot be proposed
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
    encounter = _reference(original.get("encounter")) or _context_reference(("Encounter",), request.encounter_id)
    if encounter and is_reference(encounter):
        resource["encounter"] = encounter
    requester = _reference(original.get("requester")) or _context_reference(
        ("Practitioner", "PractitionerRole"), request.user_id
    )
    if requester and is_reference(requester):
        resource["requester"] = requester
    reasons_key = "reason" if shape == "R5" else "reasonCode"
    reasons = [r for r in as_list(original.get(reasons_key)) if isinstance(r, dict)]
    valid = is_codeable_reference if shape == "R5" else is_codeable_concept
    if reasons and all(valid(r) for r in reasons):
        resource[reasons_key] = reasons
    resource["bodySite"] = [{"coding": [alternative.body_site.to_fhir()], "text": alternative.body_site.display}]
    note = verdict.policy.replacement_note.replace("{order}", order_name(verdict))
    resource["note"] = [{"text": note}]
    return resource
