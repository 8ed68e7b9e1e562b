"""order-dispatch and appointment-book: the orders a hook names by reference, from prefetch or read, as DraftOrders.

order-dispatch names its orders in context.dispatchedOrders ("ServiceRequest/123"); appointment-book carries
Appointments whose basedOn names them. Either way the ServiceRequests come from the request's prefetch, else the
adapter reads them from the client's FHIR server (`missing`, then `complete` with what it read). Each one is then
judged exactly as a draft order on order-sign; an Appointment with no order behind it is judged from its own fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .appointments import read_appointment, with_appointment
from .errors import InvalidRequest
from .orders import as_list, iter_bundle_resources
from .tolerant import well_formed

if TYPE_CHECKING:
    from .request import DraftOrder, HookRequest

DISPATCH = "order-dispatch"
APPOINTMENT_BOOK = "appointment-book"
ENCOUNTER_START = "encounter-start"
# Hooks whose context carries no draftOrders.
HOOKS = (DISPATCH, APPOINTMENT_BOOK, ENCOUNTER_START)
# The prefetch each hook adds to the policy's (patient, coverage): the CRD standard expressions, as the test kit's
# discovery_standard_prefetch_expressions_test lists them (CRD 2.2.1 found-29).
SERVICE_REQUESTS = "serviceRequests"
HOOK_PREFETCH: dict[str, dict[str, str]] = {
    DISPATCH: {SERVICE_REQUESTS: "ServiceRequest?_id={{context.dispatchedOrders.resolve().ofType(ServiceRequest).id}}"},
    APPOINTMENT_BOOK: {
        SERVICE_REQUESTS: "ServiceRequest?_id={{context.appointments.entry.resource.basedOn.resolve()"
        ".ofType(ServiceRequest).id}}"
    },
}
_MAX_ORDERS = 200


@dataclass
class ReferencedOrders:
    """The ServiceRequests a hook names, what was found of them, and the appointments that book them."""

    hook: str
    wanted: list[str] = field(default_factory=list)  # "ServiceRequest/<id>", in the order the hook names them
    found: dict[str, dict[str, Any]] = field(default_factory=dict)
    appointments: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # Orders that could not be read (CRD 2.2.1 resp-43 answers them `technical`), and why, in words safe to send.
    unread: list[str] = field(default_factory=list)
    failure: str = ""
    done: bool = False

    @property
    def missing(self) -> list[str]:
        return [ref for ref in self.wanted if ref not in self.found]


def _tail(reference: str) -> str | None:
    """ "ServiceRequest/abc" of "ServiceRequest/abc", "https://ehr/fhir/ServiceRequest/abc" or ".../_history/2"."""
    parts = [p for p in reference.strip().split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-1] or not parts[-2][:1].isupper():
        return None
    return f"{parts[-2]}/{parts[-1]}"


def _service_requests(references: list[str]) -> list[str]:
    out: list[str] = []
    for reference in references:
        tail = _tail(reference)
        if tail and tail.startswith("ServiceRequest/") and tail not in out:
            out.append(tail)
    return out[:_MAX_ORDERS]


def _from_prefetch(prefetch: dict[str, Any] | None, wanted: list[str]) -> dict[str, dict[str, Any]]:
    """The wanted ServiceRequests wherever the prefetch holds them (the serviceRequests key, or any other)."""
    found: dict[str, dict[str, Any]] = {}
    want = set(wanted)
    for value in (prefetch or {}).values():
        resources = [value] if isinstance(value, dict) and value.get("resourceType") != "Bundle" else []
        resources += [r for r, _ in iter_bundle_resources(value)]
        for resource in resources:
            rid = resource.get("id")
            ref = f"ServiceRequest/{rid}" if isinstance(rid, str) else None
            if resource.get("resourceType") == "ServiceRequest" and ref in want:
                found.setdefault(ref, resource)
    return found


def read_context(request: HookRequest) -> None:
    """Check the hook's context (a 400 only where what the engine reads cannot be read as meant) and find what the
    prefetch already holds. encounter-start names no orders."""
    scope = ReferencedOrders(request.hook)
    request.scope = scope
    context = request.context
    if request.hook == DISPATCH:
        raw = context.get("dispatchedOrders")
        if raw is None:
            raise InvalidRequest(
                "The order-dispatch context has no 'dispatchedOrders'.", expression="context.dispatchedOrders"
            )
        if isinstance(raw, str):
            raw = [raw]  # one reference sent bare: the meaning is unambiguous
        if not isinstance(raw, list) or not all(isinstance(r, str) and r.strip() for r in raw):
            raise InvalidRequest(
                "'context.dispatchedOrders' must be an array of references such as 'ServiceRequest/123'.",
                expression="context.dispatchedOrders",
            )
        scope.wanted = _service_requests(raw)
    elif request.hook == APPOINTMENT_BOOK:
        bundle = context.get("appointments")
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InvalidRequest("'context.appointments' must be a FHIR Bundle.", expression="context.appointments")
        based: list[str] = []
        for i, entry in enumerate(as_list(bundle.get("entry"))):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Appointment":
                scope.appointments.append((i, resource))
                based += [r["reference"] for r in _based_on(resource)]
        scope.wanted = _service_requests(based)
    scope.found = _from_prefetch(request.prefetch, scope.wanted)
    if not scope.missing:
        complete(request, {}, "")


def _based_on(appointment: dict[str, Any]) -> list[dict[str, str]]:
    return [
        r
        for r in as_list(appointment.get("basedOn"))
        if isinstance(r, dict) and isinstance(r.get("reference"), str) and r["reference"].strip()
    ]


def _with_performers(order: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """order-dispatch: who will perform the order is evidence too (a DMX facility): the order's performer names and
    the fulfillment Tasks' owners are read as order details (what the order asks for, where the policy's technique
    words count; performerType is the service line, read for other evidence), the Tasks' descriptions as notes."""
    performers = [{"text": p["display"]} for p in as_list(order.get("performer")) if _display(p)]
    notes: list[dict[str, Any]] = []
    for task in as_list(context.get("fulfillmentTasks")):
        if not isinstance(task, dict):
            continue
        if _display(task.get("owner")):
            performers.append({"text": task["owner"]["display"]})
        if isinstance(task.get("description"), str) and task["description"].strip():
            notes.append({"text": task["description"]})
    out = dict(order)
    if performers:
        out["orderDetail"] = [*as_list(order.get("orderDetail")), *performers]
    if notes:
        out["note"] = [*as_list(order.get("note")), *notes]
    return out


def _display(reference: Any) -> bool:
    return isinstance(reference, dict) and isinstance(reference.get("display"), str) and bool(reference["display"])


def complete(request: HookRequest, read: dict[str, dict[str, Any]], failure: str) -> None:
    """The orders to judge, from what the prefetch held and the adapter read; an order neither held is unread."""
    from .request import DraftOrder

    scope = request.scope
    if scope is None or scope.done:
        return
    scope.done = True
    scope.found.update({ref: resource for ref, resource in read.items() if ref in scope.wanted})
    scope.unread = scope.missing
    scope.failure = failure or ("the FHIR server did not return it" if scope.unread else "")
    orders: list[DraftOrder] = []
    seen: set[str] = set()

    def order(ref: str, readable: dict[str, Any]) -> None:
        if ref not in seen:  # one judgement (and one action) per order, however many appointments book it
            seen.add(ref)
            orders.append(DraftOrder(scope.found[ref], readable))

    if scope.hook == DISPATCH:
        for ref in scope.wanted:
            if ref in scope.found:
                path = f"prefetch {ref}"
                order(ref, well_formed(_with_performers(scope.found[ref], request.context), path))
    for i, appointment in scope.appointments:
        path = f"context.appointments.entry[{i}].resource"
        refs = _service_requests([r["reference"] for r in _based_on(appointment)])
        if not refs:
            rid = appointment.get("id")
            key = f"Appointment/{rid}" if isinstance(rid, str) else f"Appointment#{i}"
            if key not in seen:
                seen.add(key)
                orders.append(DraftOrder(appointment, read_appointment(appointment, path)))
            continue
        for ref in refs:
            if ref in scope.found:
                order(ref, with_appointment(well_formed(scope.found[ref], f"prefetch {ref}"), appointment, path))
    request.orders = orders
