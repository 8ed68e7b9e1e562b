"""Build the CDS Hooks card for a flagged order: warning, evidence, why it matched, and what to order instead."""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

from fhir.resources.codeableconcept import CodeableConcept as CodeableConceptR5
from fhir.resources.codeablereference import CodeableReference as CodeableReferenceR5
from fhir.resources.R4B.codeableconcept import CodeableConcept as CodeableConceptR4
from fhir.resources.R4B.reference import Reference as ReferenceR4
from fhir.resources.R4B.servicerequest import ServiceRequest as ServiceRequestR4
from fhir.resources.reference import Reference as ReferenceR5
from fhir.resources.servicerequest import ServiceRequest as ServiceRequestR5
from pydantic import ValidationError

from .matching import Verdict, explain_lines
from .orders import as_list
from .policy import Alternative

if TYPE_CHECKING:
    from .hooks import HookRequest

log = logging.getLogger(__name__)

# FHIR ServiceRequest category example value set: SNOMED CT 363679005 "Imaging".
_IMAGING = {"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}
_INTENTS = {
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
_PRIORITIES = {"routine", "urgent", "asap", "stat"}
# fhir.resources models for the two shapes: R4 is read with R4B (same ServiceRequest), R5 with R5.
_MODELS: dict[str, dict[str, Any]] = {
    "R4": {"ServiceRequest": ServiceRequestR4, "CodeableConcept": CodeableConceptR4, "Reference": ReferenceR4},
    "R5": {
        "ServiceRequest": ServiceRequestR5,
        "CodeableConcept": CodeableConceptR5,
        "Reference": ReferenceR5,
        "CodeableReference": CodeableReferenceR5,
    },
}
_REASON_TYPE = {"R4": "CodeableConcept", "R5": "CodeableReference"}
_VALIDATED_TEMPLATES: set[tuple[str, str, str, str]] = set()
# Fixed namespace so the replacement order for a given draft keeps the same id across calls (idempotent for EHRs).
_ALTERNATIVE_NS = uuid.UUID("6f1c1a52-8f0e-4c56-9a51-7d0f3e0b2c44")


def build_card(verdict: Verdict, request: HookRequest) -> dict[str, Any]:
    """One card for one flagged order (CDS Hooks 2.0 card; CRD associated-resource extension)."""
    policy = verdict.policy
    text = policy.card
    order = verdict.order
    card: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": text.summary,
        "indicator": text.indicator,
        "detail": _detail(verdict),
        "source": {"label": policy.payer, "url": policy.url, "topic": text.topic.to_fhir()},
    }
    suggestions = _suggestions(verdict, request)
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "at-most-one"
    card["overrideReasons"] = [reason.to_fhir() for reason in text.override_reasons]
    card["links"] = [dict(link) for link in text.links]
    if order.reference:
        card["extension"] = {"davinci-crd.associated-resource": [{"reference": order.reference}]}
    return card


def _detail(verdict: Verdict) -> str:
    policy = verdict.policy
    text = policy.card
    order = verdict.order
    name = _md(" ".join(order.label().split())[:200])
    heading = f"**Order:** {name}" + (f" ({_md(order.reference)})" if order.reference else "")
    why = "\n".join(f"- {_md(line)}" for line in explain_lines(verdict))
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
            f"*Medical policy {policy.reference} (version {policy.version}). If this order is not dynamic spinal "
            'imaging, override with the reason "not a dynamic spinal study" so the policy can be corrected.*',
        ]
    )


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|!~])")


def _md(text: str) -> str:
    """Client text shown as text: no markdown of the client's (links, images, HTML) renders in the EHR's card."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _suggestions(verdict: Verdict, request: HookRequest) -> list[dict[str, Any]]:
    order = verdict.order
    if not order.reference:
        return []  # nothing to delete by id; the card still warns
    text = verdict.policy.card
    delete = {"type": "delete", "description": text.remove_description, "resourceId": order.reference}
    suggestions: list[dict[str, Any]] = [
        {"label": text.remove_label, "uuid": str(uuid.uuid4()), "actions": [delete]},
    ]
    alternative = verdict.policy.alternatives.get(verdict.region or "")
    if alternative:
        resource = alternative_order(verdict, alternative, request)
        if resource is not None:
            suggestions.append(
                {
                    "label": alternative.suggestion_label,
                    "uuid": str(uuid.uuid4()),
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
            )
    return suggestions


def _choice(value: Any, allowed: set[str], default: str | None) -> str | None:
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

    Built in the FHIR version the client used for the draft (R4 or R5) and validated with fhir.resources, so the
    EHR receives a resource it can store.
    """
    original = verdict.order.resource
    shape = verdict.order.shape
    subject = _reference(original.get("subject")) or _context_reference(("Patient",), request.patient_id)
    if subject is None:
        return None  # a ServiceRequest needs a subject; without one the replacement cannot be proposed
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": str(uuid.uuid5(_ALTERNATIVE_NS, f"{verdict.order.reference}|{alternative.region}")),
        "status": "draft",
        "intent": _choice(original.get("intent"), _INTENTS, "order"),
        "category": [c for c in as_list(original.get("category")) if isinstance(c, dict)] or [_IMAGING],
    }
    concept = {"coding": [alternative.code.to_fhir()], "text": alternative.code.display}
    resource["code"] = {"concept": concept} if shape == "R5" else concept
    priority = _choice(original.get("priority"), _PRIORITIES, None)
    if priority:
        resource["priority"] = priority
    resource["subject"] = subject
    encounter = _reference(original.get("encounter")) or _context_reference(("Encounter",), request.encounter_id)
    if encounter:
        resource["encounter"] = encounter
    requester = _reference(original.get("requester")) or _context_reference(
        ("Practitioner", "PractitionerRole"), request.user_id
    )
    if requester:
        resource["requester"] = requester
    reasons_key = "reason" if shape == "R5" else "reasonCode"
    reasons = [r for r in as_list(original.get(reasons_key)) if isinstance(r, dict)]
    if reasons:
        resource[reasons_key] = reasons
    resource["bodySite"] = [{"coding": [alternative.body_site.to_fhir()], "text": alternative.body_site.display}]
    resource["note"] = [
        {
            "text": f"Replaces {verdict.order.reference}: dynamic spinal visualization is "
            f"investigational under medical policy {verdict.policy.reference}."
        }
    ]
    models = _MODELS[shape]
    if not all(
        _valid(models["Reference"], resource[k]) for k in ("subject", "encounter", "requester") if k in resource
    ):
        log.warning("replacement order for %s not proposed: a copied reference is not valid", verdict.order.reference)
        return None
    # The copied reasons and category came from the client and may be malformed: propose without them then.
    if not all(_valid(models["CodeableConcept"], c) for c in resource["category"]):
        resource["category"] = [_IMAGING]
    if reasons and not all(_valid(models[_REASON_TYPE[shape]], r) for r in reasons):
        del resource[reasons_key]
    # Everything else is built from the policy file: the whole resource is validated once per shape, policy and
    # region (a full ServiceRequest validation costs ~130 us, the parts above ~30 us).
    template = (shape, verdict.policy.id, verdict.policy.version, alternative.region)
    if template not in _VALIDATED_TEMPLATES:
        try:
            models["ServiceRequest"].model_validate(resource)
        except ValidationError as exc:
            log.warning(
                "replacement order for %s failed validation: %s", verdict.order.reference, exc.errors()[0]["msg"]
            )
            return None
        _VALIDATED_TEMPLATES.add(template)
    return resource


def _valid(model: Any, value: Any) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True
