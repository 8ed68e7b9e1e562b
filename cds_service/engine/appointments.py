"""Appointments read as ServiceRequests: what a booked study says, in the places the order reading already knows."""

from __future__ import annotations

from typing import Any

from .orders import as_list
from .tolerant import well_formed

# Appointment.status -> the ServiceRequest status the decision table reads: a booked study is an active order, a
# cancelled or mistaken booking is not judged (the table's status rule), one not yet settled is a draft.
_STATUS = {
    "proposed": "draft",
    "pending": "draft",
    "booked": "active",
    "arrived": "active",
    "checked-in": "active",
    "waitlist": "draft",
    "fulfilled": "completed",
    "cancelled": "revoked",
    "noshow": "revoked",
    "entered-in-error": "entered-in-error",
}
# The fields of a well-formed order that are lists, merged when an appointment adds to the order it is based on.
_LISTS = ("orderDetail", "bodySite", "reasonCode", "reason", "note", "category", "performerType")


def _concepts(value: Any) -> list[Any]:
    """R4 CodeableConcepts or R5 CodeableReferences (their concept), as CodeableConcepts."""
    out = []
    for item in as_list(value):
        if isinstance(item, dict) and ("concept" in item or "reference" in item):
            concept = item.get("concept")
            display = item.get("reference", {}).get("display") if isinstance(item.get("reference"), dict) else None
            if isinstance(concept, dict | str):
                out.append(concept)
            elif isinstance(display, str):
                out.append({"text": display})
        elif item is not None:
            out.append(item)
    return out


def as_service_request(appointment: dict[str, Any]) -> dict[str, Any]:
    """The order an Appointment books, in ServiceRequest's shape (R4 or R5 Appointment): serviceType is what is
    done (the code; further types are details), appointmentType a detail, serviceCategory the category,
    reasonCode (R4) / reason (R5) the reason, description and comment notes, specialty the performer type."""
    service_types = _concepts(appointment.get("serviceType"))
    status = appointment.get("status")
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": appointment.get("id"),
        "status": _STATUS.get(status, "active") if isinstance(status, str) else "active",
        "intent": "order",
    }
    if service_types:
        order["code"] = service_types[0]
    details = service_types[1:] + _concepts(appointment.get("appointmentType"))
    if details:
        order["orderDetail"] = details
    if appointment.get("serviceCategory") is not None:
        order["category"] = _concepts(appointment.get("serviceCategory"))
    reasons = _concepts(appointment.get("reasonCode")) + _concepts(appointment.get("reason"))
    if reasons:
        order["reasonCode"] = reasons
    notes = [
        {"text": text}
        for text in (appointment.get("description"), appointment.get("comment"), appointment.get("patientInstruction"))
        if isinstance(text, str) and text.strip()
    ]
    for note in as_list(appointment.get("note")):
        notes.append(note)
    if notes:
        order["note"] = notes
    if appointment.get("specialty") is not None:
        order["performerType"] = _concepts(appointment.get("specialty"))
    return order


def read_appointment(appointment: dict[str, Any], path: str) -> dict[str, Any]:
    """An Appointment with no order behind it, read as the order it books (a field that cannot be read as meant is
    a 400 naming the appointment's path)."""
    return well_formed(as_service_request(appointment), path)


def with_appointment(order: dict[str, Any], appointment: dict[str, Any], path: str) -> dict[str, Any]:
    """The order an appointment is based on (well-formed), with what the appointment adds: its service types,
    reasons, category and description read beside the order's own (the order's code stays the code)."""
    booked = read_appointment(appointment, path)
    merged = dict(order)
    extra = {key: list(booked.get(key, [])) for key in _LISTS}
    if "code" in booked:
        extra["orderDetail"].insert(0, booked["code"])
    for key, items in extra.items():
        if items:
            merged[key] = [*as_list(order.get(key)), *items]
    return merged
