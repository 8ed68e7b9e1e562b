"""A CDS Hooks request as the engine reads it: parse and check the body, and pick the orders to judge."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .errors import InvalidRequest
from .orders import as_list
from .policy.model import Service
from .tolerant import well_formed

if TYPE_CHECKING:
    from .referenced import ReferencedOrders

# orjson refuses to encode deeper than 254 levels: a body read deeper could not be sent back (cards, CRD echoes)
# or stored without a 500, so nothing deeper is accepted. Real CDS Hooks requests nest fewer than 20.
MAX_JSON_DEPTH = 254
_BOM = b"\xef\xbb\xbf"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class DraftOrder:
    """An order to judge: as the client sent it (what CRD echoes back) and in FHIR's shapes (what the engine reads)."""

    resource: dict[str, Any]
    readable: dict[str, Any]


# eq=False: a request is itself, compared and hashed by identity (the FHIR adapter keys its per-call reads on it).
@dataclass(eq=False)
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
    # The orders to judge, checked when the request was parsed (a field of the wrong type is a 400 then).
    orders: list[DraftOrder] = field(default_factory=list)
    # order-dispatch and appointment-book: the orders the hook names by reference (engine/referenced.py).
    scope: ReferencedOrders | None = None

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

    from . import referenced

    draft_orders = context.get("draftOrders") if hook not in referenced.HOOKS else {"resourceType": "Bundle"}
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
        selections = []
        for i, selection in enumerate(raw):
            # A selection that names nothing readable hides the order the clinician chose: refuse it, never skip it.
            if not isinstance(selection, str) or not selection.strip():
                where = f"context.selections[{i}]"
                raise InvalidRequest(f"'{where}' must be a reference such as 'ServiceRequest/123'.", expression=where)
            selections.append(selection.strip())

    fhir_server = body.get("fhirServer")
    fhir_authorization = body.get("fhirAuthorization")
    prefetch = body.get("prefetch")
    extension = body.get("extension")
    request = HookRequest(
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
    if hook in referenced.HOOKS:
        referenced.read_context(request)
    else:
        request.orders = orders_to_judge(request)
    return request


def _entries(bundle: dict[str, Any]) -> list[tuple[int, dict[str, Any], str | None]]:
    """(index, resource, fullUrl) for each Bundle entry that holds a resource object."""
    out = []
    for i, entry in enumerate(as_list(bundle.get("entry"))):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            full_url = entry.get("fullUrl")
            out.append((i, entry["resource"], full_url if isinstance(full_url, str) else None))
    return out


def _key(resource: dict[str, Any]) -> str | None:
    """ "Type/id" of a resource; a numeric id is read as its digits (a FHIR id is a string, some clients send 17)."""
    rid = resource.get("id")
    if isinstance(rid, int | float) and not isinstance(rid, bool):
        rid = str(rid)
    kind = resource.get("resourceType")
    return f"{kind}/{rid.strip()}" if isinstance(kind, str) and isinstance(rid, str) and rid.strip() else None


def orders_to_judge(request: HookRequest) -> list[DraftOrder]:
    """order-sign: every ServiceRequest in draftOrders; order-select: only the selected ones. Other types skipped.

    order-select: a selection that names no order in draftOrders is an inconsistent request (CDS Hooks order-select:
    "selections ... ids into draftOrders"): a 400 naming the missing references, never a 200 that judged nothing.
    Each judged order is read in FHIR's shapes (tolerant.well_formed): a field of a type that cannot be read as
    meant is a 400 naming its path, never an order passed over.
    """
    entries = _entries(request.draft_orders)
    wanted = set(request.selections) if request.selections is not None else None
    if wanted is not None:
        known = {key for _, resource, _ in entries if (key := _key(resource))}
        known |= {full_url for _, _, full_url in entries if full_url}
        # Absolute selections ("https://ehr/fhir/ServiceRequest/abc") match by their "ServiceRequest/abc" ending:
        # one set lookup each, so 450,000 selections against 200 orders stay fast.
        missing = [s for s in request.selections or () if s not in known and _tail(s) not in known]
        if missing:
            shown = ", ".join(repr(m[:100]) for m in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise InvalidRequest(
                f"context.selections names orders that are not in context.draftOrders: {shown}.",
                expression="context.selections",
            )
    orders: list[DraftOrder] = []
    seen: set[str] = set()
    tails = {_tail(s) for s in wanted} if wanted is not None else set()
    for i, resource, full_url in entries:
        if resource.get("resourceType") != "ServiceRequest":
            continue
        key = _key(resource)
        if wanted is not None and not _selected(wanted, tails, key, full_url):
            continue
        if key is not None:
            if key in seen:
                continue  # the same order listed twice is judged (and carded) once
            seen.add(key)
        orders.append(DraftOrder(resource, well_formed(resource, f"context.draftOrders.entry[{i}].resource")))
    return orders


def _tail(selection: str) -> str:
    """The last two path segments ("ServiceRequest/abc" of "https://ehr/fhir/ServiceRequest/abc")."""
    return "/".join(selection.rsplit("/", 2)[-2:])


def _selected(wanted: set[str], tails: set[str], key: str | None, full_url: str | None) -> bool:
    # Selections are "ServiceRequest/<id>"; some clients send the entry's fullUrl or an absolute URL instead.
    if key is None:
        return full_url is not None and full_url in wanted
    return key in wanted or (full_url is not None and full_url in wanted) or key in tails
