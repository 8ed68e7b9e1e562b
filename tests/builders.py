"""Small builders for hook requests and orders, so each test states only what matters to it."""

from __future__ import annotations

import uuid
from typing import Any

CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"


def service_request(
    rid: str = "sr1",
    *,
    text: str | None = None,
    cpt: str | None = None,
    body_site: tuple[str, str] | str | None = None,
    r5: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """A draft ServiceRequest: code text and/or CPT code, optional body site (SNOMED code+display, or text)."""
    concept: dict[str, Any] = {}
    if cpt:
        concept["coding"] = [{"system": CPT, "code": cpt}]
    if text:
        concept["text"] = text
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/pat-1"},
        "encounter": {"reference": "Encounter/enc-1"},
        "requester": {"reference": "Practitioner/prac-1"},
    }
    if concept:
        resource["code"] = {"concept": concept} if r5 else concept
    if isinstance(body_site, tuple):
        resource["bodySite"] = [{"coding": [{"system": SNOMED, "code": body_site[0], "display": body_site[1]}]}]
    elif isinstance(body_site, str):
        resource["bodySite"] = [{"text": body_site}]
    resource.update(fields)
    return resource


def medication_request(rid: str = "med1") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/pat-1"},
        "medicationCodeableConcept": {"text": "Ibuprofen 400 MG Oral Tablet"},
    }


def hook_request(
    hook: str, resources: list[dict[str, Any]], *, selections: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """A CDS Hooks 2.0 request for order-select (selections default to every ServiceRequest) or order-sign."""
    context: dict[str, Any] = {
        "userId": "Practitioner/prac-1",
        "patientId": "pat-1",
        "encounterId": "enc-1",
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]},
    }
    if hook == "order-select":
        context["selections"] = (
            selections
            if selections is not None
            else [f"ServiceRequest/{r['id']}" for r in resources if r.get("resourceType") == "ServiceRequest"]
        )
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    body.update(extra)
    return body
