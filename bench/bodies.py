"""Realistic order-sign request bodies for the benchmark: one DSV order among ordinary orders and medications."""

from __future__ import annotations

import random
import uuid
from typing import Any

CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
# An EHR's local orderable catalogue (Epic-style OID); every real order carries one next to the standard code.
LOCAL = "urn:oid:1.2.840.114350.1.13.861.1.7.2.696580"
SERVICE = "dsv-order-sign"
# Fixed namespace so the same seed gives byte-identical bodies on every machine (results stay comparable).
_NS = uuid.UUID("0b7f3a52-6c1e-4f8e-9d0a-1c2b3d4e5f60")

# (category, cpt, local display, code text, body site (snomed, display) or None, reason (icd10, display), note)
# Ordinary orders of a spine and primary-care clinic; several name the spine, none is a dynamic study.
_ORDINARY: list[tuple[str, str, str, str, tuple[str, str] | None, tuple[str, str], str]] = [
    (
        "imaging",
        "72100",
        "XR LUMBAR SPINE 2-3 VIEWS",
        "XR lumbar spine AP and lateral",
        ("122496007", "Lumbar spine"),
        ("M54.50", "Low back pain, unspecified"),
        "Pain for 6 weeks despite NSAIDs and home exercise.",
    ),
    (
        "imaging",
        "72148",
        "MRI LUMBAR SPINE WO CONTRAST",
        "MRI lumbar spine without contrast",
        ("122496007", "Lumbar spine"),
        ("M51.16", "Intervertebral disc disorders with radiculopathy, lumbar region"),
        "Radicular pain L5 distribution, positive straight leg raise on the left.",
    ),
    (
        "imaging",
        "72141",
        "MRI CERVICAL SPINE WO CONTRAST",
        "MRI cervical spine without contrast",
        ("122494005", "Cervical spine"),
        ("M50.10", "Cervical disc disorder with radiculopathy, unspecified cervical region"),
        "Numbness of the right thumb and index finger for 3 months.",
    ),
    (
        "imaging",
        "72040",
        "XR CERVICAL SPINE 2-3 VIEWS",
        "XR cervical spine 2 or 3 views",
        ("122494005", "Cervical spine"),
        ("M54.2", "Cervicalgia"),
        "Neck pain after a fall from standing height; no neurological deficit.",
    ),
    (
        "imaging",
        "73562",
        "XR KNEE 3 VIEWS RIGHT",
        "XR knee right 3 views",
        ("6757004", "Right knee region structure"),
        ("M17.11", "Unilateral primary osteoarthritis, right knee"),
        "Weight-bearing views please.",
    ),
    (
        "imaging",
        "70450",
        "CT HEAD WO CONTRAST",
        "CT head without contrast",
        ("69536005", "Head structure"),
        ("R51.9", "Headache, unspecified"),
        "New daily headache, age over 50.",
    ),
    (
        "imaging",
        "76700",
        "US ABDOMEN COMPLETE",
        "Ultrasound abdomen complete",
        ("818983003", "Abdomen structure"),
        ("R10.11", "Right upper quadrant pain"),
        "Postprandial RUQ pain; rule out cholelithiasis.",
    ),
    (
        "lab",
        "85025",
        "CBC WITH DIFFERENTIAL",
        "CBC with automated differential",
        None,
        ("R53.83", "Other fatigue"),
        "Fasting not required.",
    ),
    (
        "lab",
        "80061",
        "LIPID PANEL",
        "Lipid panel",
        None,
        ("E78.5", "Hyperlipidemia, unspecified"),
        "Fasting 10 hours.",
    ),
    (
        "lab",
        "83036",
        "HEMOGLOBIN A1C",
        "Hemoglobin A1c",
        None,
        ("E11.9", "Type 2 diabetes mellitus without complications"),
        "Quarterly monitoring.",
    ),
    (
        "therapy",
        "97161",
        "PT EVAL LOW COMPLEXITY",
        "Physical therapy evaluation, low complexity",
        ("122496007", "Lumbar spine"),
        ("M54.50", "Low back pain, unspecified"),
        "Core strengthening and McKenzie program; 2 visits a week for 6 weeks.",
    ),
    (
        "procedure",
        "93306",
        "ECHO TTE COMPLETE",
        "Transthoracic echocardiogram complete with Doppler",
        None,
        ("R01.1", "Cardiac murmur, unspecified"),
        "New systolic murmur on exam.",
    ),
]

_CATEGORY = {
    "imaging": (SNOMED, "363679005", "Imaging"),
    "lab": (SNOMED, "108252007", "Laboratory procedure"),
    "therapy": (SNOMED, "91251008", "Physical therapy procedure"),
    "procedure": (SNOMED, "387713003", "Surgical procedure"),
}

# The flagged order: dynamic spinal visualization written the ways EHR catalogues and clinicians write it.
_DSV: list[tuple[str, str, str, tuple[str, str], tuple[str, str], str]] = [
    (
        "76499",
        "XR SPINE DIGITAL MOTION CERVICAL",
        "Digital motion x-ray of the cervical spine",
        ("122494005", "Cervical spine"),
        ("M54.2", "Cervicalgia"),
        "Whiplash 2019, persistent neck pain; assess ligament laxity.",
    ),
    (
        "76120",
        "FLUORO SPINE MOTION STUDY",
        "Videofluoroscopy lumbar spine flexion/extension",
        ("122496007", "Lumbar spine"),
        ("M53.2X6", "Spinal instabilities, lumbar region"),
        "Suspected instability L4-5; compare with prior static films.",
    ),
    (
        "76496",
        "VERTEBRAL MOTION ANALYSIS LUMBAR",
        "Vertebral motion analysis (KineGraph) lumbar spine",
        ("122496007", "Lumbar spine"),
        ("M54.50", "Low back pain, unspecified"),
        "Surgeon requests VMA before fusion planning.",
    ),
]

_MEDICATIONS: list[tuple[str, str, str, float, str, int]] = [
    ("197806", "ibuprofen 600 MG Oral Tablet", "Take 1 tablet by mouth every 8 hours with food as needed", 8, "h", 30),
    ("198013", "naproxen 500 MG Oral Tablet", "Take 1 tablet by mouth twice daily with food", 12, "h", 60),
    ("197904", "cyclobenzaprine hydrochloride 10 MG Oral Tablet", "Take 1 tablet by mouth at bedtime", 1, "d", 30),
    ("310965", "gabapentin 300 MG Oral Capsule", "Take 1 capsule by mouth three times daily", 8, "h", 90),
    ("617314", "atorvastatin 10 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, "d", 90),
    ("860975", "metformin 500 MG Oral Tablet", "Take 1 tablet by mouth twice daily with meals", 12, "h", 90),
]


def _ref(kind: str, rid: str, display: str | None = None) -> dict[str, str]:
    out = {"reference": f"{kind}/{rid}"}
    if display:
        out["display"] = display
    return out


def _common(rid: str, rng: random.Random) -> dict[str, Any]:
    return {
        "id": rid,
        "meta": {"lastUpdated": "2026-11-27T09:14:03Z"},
        "identifier": [
            {
                "use": "official",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}]},
                "system": "urn:oid:1.2.840.114350.1.13.861.1.7.2.798268",
                "value": str(rng.randrange(10**8, 10**9)),
            }
        ],
        "status": "draft",
        "intent": "order",
        "subject": _ref("Patient", "pat-1", "Doe, Jane"),
        "encounter": _ref("Encounter", "enc-1"),
        "requester": _ref("Practitioner", "prac-1", "Smith, Alex MD"),
    }


def service_request(
    rid: str,
    rng: random.Random,
    *,
    cpt: str,
    local: str,
    text: str,
    site: tuple[str, str] | None,
    reason: tuple[str, str],
    note: str,
    category: str = "imaging",
) -> dict[str, Any]:
    """An R4 draft ServiceRequest as an EHR sends it: CPT plus local code, site, reason, note, insurance."""
    system, code, display = _CATEGORY[category]
    resource: dict[str, Any] = {"resourceType": "ServiceRequest", **_common(rid, rng)}
    resource["category"] = [{"coding": [{"system": system, "code": code, "display": display}], "text": display}]
    resource["priority"] = "routine"
    resource["code"] = {
        "coding": [
            {"system": CPT, "code": cpt},
            {"system": LOCAL, "code": str(rng.randrange(10000, 99999)), "display": local},
        ],
        "text": text,
    }
    resource["quantityQuantity"] = {"value": 1, "unit": "Procedure", "system": "http://unitsofmeasure.org"}
    resource["occurrenceDateTime"] = "2026-12-01"
    resource["authoredOn"] = "2026-11-27T09:14:03Z"
    resource["performer"] = [_ref("Organization", "org-rad", "Main Street Radiology")]
    reason_coding = {"system": ICD10, "code": reason[0], "display": reason[1]}
    resource["reasonCode"] = [{"coding": [reason_coding], "text": reason[1]}]
    resource["insurance"] = [_ref("Coverage", "cov-1")]
    if site:
        resource["bodySite"] = [{"coding": [{"system": SNOMED, "code": site[0], "display": site[1]}], "text": site[1]}]
    resource["note"] = [{"authorReference": _ref("Practitioner", "prac-1"), "text": note}]
    resource["patientInstruction"] = "Please arrive 15 minutes early and bring a list of your medications."
    return resource


def medication_request(rid: str, rng: random.Random, index: int) -> dict[str, Any]:
    rxnorm, display, sig, period, unit, quantity = _MEDICATIONS[index % len(_MEDICATIONS)]
    resource: dict[str, Any] = {"resourceType": "MedicationRequest", **_common(rid, rng)}
    resource["category"] = [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                    "code": "outpatient",
                    "display": "Outpatient",
                }
            ]
        }
    ]
    resource["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": rxnorm, "display": display}]}
    resource["authoredOn"] = "2026-11-27T09:14:03Z"
    resource["dosageInstruction"] = [
        {
            "sequence": 1,
            "text": sig,
            "timing": {"repeat": {"frequency": 1, "period": period, "periodUnit": unit}},
            "asNeededBoolean": "as needed" in sig,
            "route": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral route"}]},
            "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet", "system": "http://unitsofmeasure.org"}}],
        }
    ]
    resource["dispenseRequest"] = {
        "numberOfRepeatsAllowed": 1,
        "quantity": {"value": quantity, "unit": "tablet", "system": "http://unitsofmeasure.org"},
        "expectedSupplyDuration": {"value": 30, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"},
    }
    resource["substitution"] = {"allowedBoolean": True}
    return resource


def _prefetch() -> dict[str, Any]:
    patient = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [{"system": "urn:oid:1.2.840.114350.1.13.861.1.7.5.737384.14", "value": "E4471"}],
        "name": [{"use": "official", "family": "Doe", "given": ["Jane", "Q"]}],
        "gender": "female",
        "birthDate": "1968-04-02",
        "address": [{"line": ["12 Main St"], "city": "Springfield", "state": "MS", "postalCode": "39201"}],
    }
    coverage = {
        "resourceType": "Coverage",
        "id": "cov-1",
        "status": "active",
        "subscriberId": "XKM123456789",
        "beneficiary": _ref("Patient", "pat-1"),
        "relationship": {"coding": [{"code": "self"}]},
        "period": {"start": "2026-01-01", "end": "2026-12-31"},
        "payor": [_ref("Organization", "payer-1", "Example Health Plan")],
        "class": [
            {"type": {"coding": [{"code": "group"}]}, "value": "G-2290", "name": "Example Employer PPO"},
            {"type": {"coding": [{"code": "plan"}]}, "value": "PPO-500", "name": "PPO 500"},
        ],
    }
    return {
        "patient": patient,
        "coverage": {"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [{"resource": coverage}]},
    }


def order_sign_body(
    orders: int, *, seed: int = 7, variant: int = 0, dsv: int = 1, fhir_server: str | None = None
) -> dict[str, Any]:
    """An order-sign request with `orders` draft orders: `dsv` dynamic spinal orders, then ServiceRequests and
    MedicationRequests alternating (for 5 orders: 1 DSV, 2 ServiceRequests, 2 MedicationRequests).

    With `fhir_server`, the Coverage is not prefetched: the service reads it from that server (CRD) when it flags.

    `variant` changes the hookInstance, the ids and which DSV wording is used, so a pool of bodies is not one
    request repeated.
    """
    rng = random.Random(seed * 1_000_003 + variant * 101 + orders)
    resources: list[dict[str, Any]] = []
    site: tuple[str, str] | None  # every DSV order names its site; an ordinary one may not
    for i in range(min(dsv, orders)):
        cpt, local, text, site, reason, note = _DSV[(variant + i) % len(_DSV)]
        resources.append(
            service_request(
                f"sr-dsv-{variant}-{i}", rng, cpt=cpt, local=local, text=text, site=site, reason=reason, note=note
            )
        )
    others = orders - len(resources)
    for i in range(others):
        if i % 2 == 0:
            category, cpt, local, text, site, reason, note = _ORDINARY[(variant + i // 2) % len(_ORDINARY)]
            resources.append(
                service_request(
                    f"sr-{variant}-{i}",
                    rng,
                    cpt=cpt,
                    local=local,
                    text=text,
                    site=site,
                    reason=reason,
                    note=note,
                    category=category,
                )
            )
        else:
            resources.append(medication_request(f"med-{variant}-{i}", rng, variant + i // 2))
    return {
        "hook": "order-sign",
        "hookInstance": str(uuid.uuid5(_NS, f"{seed}/{orders}/{variant}")),
        "fhirServer": fhir_server or "https://ehr.example.org/fhir/R4",
        "fhirAuthorization": {
            "access_token": "bench-not-a-real-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read patient/Coverage.read",
            "subject": SERVICE,
        },
        "context": {
            "userId": "Practitioner/prac-1",
            "patientId": "pat-1",
            "encounterId": "enc-1",
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid5(_NS, r['id'])}", "resource": r} for r in resources],
            },
        },
        "prefetch": {k: v for k, v in _prefetch().items() if not (fhir_server and k == "coverage")},
    }


def flagged_ids(body: dict[str, Any]) -> list[str]:
    """The references of the orders the generator meant as dynamic spinal visualization."""
    return [
        f"ServiceRequest/{e['resource']['id']}"
        for e in body["context"]["draftOrders"]["entry"]
        if e["resource"]["id"].startswith("sr-dsv-")
    ]
