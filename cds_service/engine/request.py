"""A CDS Hooks request as the engine reads it: parse and check the body, and pick the orders to judge."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import InvalidRequest
from .orders import OrderView, iter_bundle_resources, read_order
from .policy.model import Service

# orjson refuses to encode deeper than 254 levels: a body read deeper could not be sent back (cards, CRD echoes)
# or stored without a 500, so nothing deeper is accepted. Real CDS Hooks requests nest fewer than 20.
MAX_JSON_DEPTH = 254
_BOM = b"\xef\xbb\xbf"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass
class HookRequest:
    """The parts of a CDS Hooks 2.0 request this service reads."""

    hook: str
    hook_instance: str
    context: dict[str, Any]
    draft_orders: dict[str, Any]
    selections: list[str] | None
    fhir_server: str | None = None
    fhir_authorization: dict[str, Any] | None = None
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] = field(default_factory=dict)
    # What this call already read from the FHIR server, by prefetch key, so nothing is read twice.
    fetched: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def patient_id(self) -> str | None:
        value = self.context.get("patientId")
        return value if isinstance(value, str) and value else None

    @property
    def user_id(self) -> str | None:
        value = self.context.get("userId")
        return value if isinstance(value, str) and value else None

    @property
    def encounter_id(self) -> str | None:
        value = self.context.get("encounterId")
        return value if isinstance(value, str) and value else None

    @property
    def access_token(self) -> str | None:
        auth = self.fhir_authorization or {}
        token = auth.get("access_token")
        return token if isinstance(token, str) and token else None


def parse_json(data: bytes) -> Any:
    """A request body as JSON, for the web layer and the command line; InvalidRequest when it is not JSON or too deep.

    orjson rejects invalid UTF-8, lone surrogates, NaN/Infinity and numbers that overflow a double; duplicate keys
    keep the last value, as JavaScript's JSON.parse does (RFC 8259 leaves it to the parser).
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]  # RFC 8259 section 8.1: a parser may ignore a byte order mark; some clients send one
    if not data.strip():
        raise InvalidRequest("The request body is empty; send a CDS Hooks request as JSON.")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = str(exc).split(":")[0]
        if reason.startswith("depth limit"):
            raise InvalidRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
        raise InvalidRequest(f"The request body is not valid JSON: {reason}.") from None
    try:
        # The depth check: re-encoding runs in C and fails past MAX_JSON_DEPTH. Measured: under 1 us for a typical
        # request, about a tenth of the parse time for 5 MB; a Python walk of the parsed body costs 2-3x the parse.
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise InvalidRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    return body


def parse_hook_request(body: Any, service: Service) -> HookRequest:
    """Check a decoded request body against CDS Hooks 2.0 and the service's hook; InvalidRequest says what is wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object (a CDS Hooks request).")
    for name in ("hook", "hookInstance", "context"):
        if name not in body or body[name] is None:
            raise InvalidRequest(
                f"The request has no '{name}'; CDS Hooks requires hook, hookInstance and context.", expression=name
            )
    hook = body["hook"]
    if not isinstance(hook, str):
        raise InvalidRequest("'hook' must be a string.", expression="hook")
    if hook != service.hook:
        raise InvalidRequest(
            f"Service '{service.id}' answers the '{service.hook}' hook, not '{hook[:64]}'.", expression="hook"
        )
    hook_instance = body["hookInstance"]
    if not isinstance(hook_instance, str) or not _UUID.fullmatch(hook_instance.strip()):
        raise InvalidRequest("'hookInstance' must be a UUID.", expression="hookInstance")
    context = body["context"]
    if not isinstance(context, dict):
        raise InvalidRequest("'context' must be an object.", expression="context")

    draft_orders = context.get("draftOrders")
    if draft_orders is None:
        raise InvalidRequest(f"The {hook} context has no 'draftOrders'.", expression="context.draftOrders")
    if not isinstance(draft_orders, dict) or draft_orders.get("resourceType") != "Bundle":
        raise InvalidRequest("'context.draftOrders' must be a FHIR Bundle.", expression="context.draftOrders")

    selections: list[str] | None = None
    if hook == "order-select":
        raw = context.get("selections")
        if raw is None:
            raise InvalidRequest("The order-select context has no 'selections'.", expression="context.selections")
        if isinstance(raw, str):
            raw = [raw]  # one selection sent bare: the meaning is unambiguous
        if not isinstance(raw, list):
            raise InvalidRequest(
                "'context.selections' must be an array of references such as 'ServiceRequest/123'.",
                expression="context.selections",
            )
        selections = [s.strip() for s in raw if isinstance(s, str) and s.strip()]

    fhir_server = body.get("fhirServer")
    fhir_authorization = body.get("fhirAuthorization")
    prefetch = body.get("prefetch")
    extension = body.get("extension")
    return HookRequest(
        hook=hook,
        hook_instance=hook_instance.strip(),
        context=context,
        draft_orders=draft_orders,
        selections=selections,
        fhir_server=fhir_server if isinstance(fhir_server, str) and fhir_server else None,
        fhir_authorization=fhir_authorization if isinstance(fhir_authorization, dict) else None,
        prefetch=prefetch if isinstance(prefetch, dict) else None,
        extension=extension if isinstance(extension, dict) else {},
    )


def orders_to_judge(request: HookRequest) -> list[OrderView]:
    """The orders to judge, read (see resources_to_judge)."""
    return [read_order(resource) for resource in resources_to_judge(request)]


def resources_to_judge(request: HookRequest) -> list[dict[str, Any]]:
    """order-sign: every ServiceRequest in draftOrders; order-select: only the selected ones. Other types skipped."""
    orders: list[dict[str, Any]] = []
    seen: set[str] = set()
    wanted = set(request.selections) if request.selections is not None else None
    # The "ServiceRequest/<id>" ending of each absolute selection, indexed once: O(selections + orders), not their
    # product (a hostile 450,000 selections against 200 orders took 25 s with a scan per order).
    tails = {_tail(s) for s in wanted} if wanted is not None else set()
    for resource, full_url in iter_bundle_resources(request.draft_orders):
        if resource.get("resourceType") != "ServiceRequest":
            continue
        rid = resource.get("id")
        key = f"ServiceRequest/{rid}" if isinstance(rid, str) else None
        if wanted is not None and not _selected(wanted, tails, key, full_url):
            continue
        if key is not None:
            if key in seen:
                continue  # the same order listed twice is judged (and carded) once
            seen.add(key)
        orders.append(resource)
    return orders


def _tail(selection: str) -> str:
    """The last two path segments ("ServiceRequest/abc" of "https://ehr/fhir/ServiceRequest/abc")."""
    return "/".join(selection.rsplit("/", 2)[-2:])


def _selected(wanted: set[str], tails: set[str], key: str | None, full_url: str | None) -> bool:
    # Selections are "ServiceRequest/<id>"; some clients send the entry's fullUrl or an absolute URL instead.
    if key is None:
        return full_url is not None and full_url in wanted
    return key in wanted or (full_url is not None and full_url in wanted) or key in tails
