"""The audit log as FHIR R4 AuditEvents in the style of IHE BALP: NDJSON, or PUT in batch Bundles to a FHIR server."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from sqlalchemy import select

from ..engine.outcome import VerdictRecord
from .db import Database
from .models import audit_call

# AuditEvent ids are uuid5(this, call id): the same call always gives the same id, so a re-export replaces.
EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cds-service:audit-event")
SERVICE_NAME = "cds-service"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
# The hook (order-select, order-sign, ...) as the event's second subtype: CDS Hooks names hooks, with no code system.
CDS_HOOKS = "https://cds-hooks.hl7.org"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
URI = "urn:ietf:rfc:3986"

_COLUMNS = (
    audit_call.c.call_id,
    audit_call.c.started_at,
    audit_call.c.service_id,
    audit_call.c.hook,
    audit_call.c.hook_instance,
    audit_call.c.iss,
    audit_call.c.tenant,
    audit_call.c.user_id,
    audit_call.c.patient_id,
    audit_call.c.status,
    audit_call.c.error,
    audit_call.c.duration_ms,
    audit_call.c.orders,
)


@dataclass(frozen=True)
class StoredCall:
    """The columns of one audit_call row that an AuditEvent carries."""

    call_id: str
    started_at: datetime
    service_id: str
    hook: str | None
    hook_instance: str | None
    iss: str | None
    tenant: str | None
    user_id: str | None
    patient_id: str | None
    status: int
    error: str | None
    duration_ms: float
    orders: list[Any] | None


def read_calls(db: Database, since: datetime | None = None, until: datetime | None = None) -> Iterator[StoredCall]:
    """The audit log's calls in the order they started, read in chunks (the report's read path: audit_call rows)."""
    where = []
    if since is not None:
        where.append(audit_call.c.started_at >= since)
    if until is not None:
        where.append(audit_call.c.started_at < until)
    with db.engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(
            select(*_COLUMNS).where(*where).order_by(audit_call.c.started_at, audit_call.c.id)
        )
        for row in rows:
            yield StoredCall(**row._asdict())


def event_id(call_id: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, call_id))


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _outcome(status: int) -> str:
    """AuditEvent.outcome: 0 success, 4 minor failure (the call was refused: 4xx), 8 serious failure (5xx)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def _reference_type(reference: str) -> str | None:
    kind = reference.split("/", 1)[0] if "/" in reference else ""
    return kind if kind[:1].isupper() and kind.isalpha() else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _identified(value: str, *, system: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """A Reference by identifier: the ids are the EHR's, not resources on the server the events go to."""
    identifier: dict[str, Any] = {"value": value}
    if system:
        identifier["system"] = system
    reference: dict[str, Any] = {"identifier": identifier}
    if kind:
        reference["type"] = kind
    return reference


def _agents(call: StoredCall, service: dict[str, Any], host: str) -> list[dict[str, Any]]:
    """The client (JWT iss, with the tenant), the service, and the user when the call named one."""
    client: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": _identified(call.iss, system=URI)
        if call.iss
        else {"display": "client not identified (CDS_AUTH=off or the call was refused before)"},
        "requestor": not call.user_id,
    }
    if call.tenant:
        client["altId"] = call.tenant
    agents: list[dict[str, Any]] = [
        client,
        {
            "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
            "who": service,
            "requestor": False,
            # type 1: a machine name, 2: an IP address
            **({"network": {"address": host, "type": "2" if _is_ip(host) else "1"}} if host else {}),
        },
    ]
    if call.user_id:
        agents.append(
            {
                "type": {"coding": [{"system": PARTICIPATION, "code": "IRCP", "display": "information recipient"}]},
                "who": _identified(call.user_id, kind=_reference_type(call.user_id)),
                "requestor": True,
            }
        )
    return agents


def _order_entity(verdict: VerdictRecord) -> dict[str, Any]:
    """A judged order: the verdict, the rule that decided it and the policy version."""
    decided = "flagged" if verdict.flagged else "not-flagged"
    entity: dict[str, Any] = {
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        "description": f"{decided} by rule {verdict.rule or '(none)'} of policy {verdict.policy} "
        f"{verdict.policy_version}",
        "detail": [
            {"type": "verdict", "valueString": decided},
            {"type": "rule", "valueString": verdict.rule or "(none)"},
            {"type": "policy", "valueString": f"{verdict.policy}|{verdict.policy_version}"},
        ],
    }
    if verdict.order:
        entity["what"] = _identified(verdict.order, kind=_reference_type(verdict.order))
    return entity


def _entities(call: StoredCall) -> list[dict[str, Any]]:
    """The patient, the hookInstance and every judged order."""
    entities: list[dict[str, Any]] = []
    if call.patient_id:
        entities.append(
            {
                "what": _identified(call.patient_id, kind="Patient"),
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    if call.hook_instance:
        entities.append(
            {
                "what": _identified(call.hook_instance),
                "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId", "display": "X-Request-Id"},
                "description": "CDS Hooks hookInstance",
            }
        )
    for stored in call.orders or []:
        verdict = VerdictRecord.from_json(stored)
        if verdict is not None:
            entities.append(_order_entity(verdict))
    return entities


def audit_event(call: StoredCall, service_url: str) -> dict[str, Any]:
    """One call as an AuditEvent: the service as the source, the client (JWT iss) and the user as agents, the
    patient, the hookInstance and every judged order as entities (with the rule that decided it), the outcome."""
    ended = call.started_at + timedelta(milliseconds=call.duration_ms)
    service = _identified(service_url, system=URI) | {"display": SERVICE_NAME}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event_id(call.call_id),
        "type": {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": [
            {"system": RESTFUL_INTERACTION, "code": "operation", "display": "operation"},
            {"system": CDS_HOOKS, "code": call.hook or "unknown", "display": f"CDS Hooks {call.hook or 'call'}"},
        ],
        "action": "E",
        "period": {"start": _instant(call.started_at), "end": _instant(ended)},
        "recorded": _instant(ended),
        "outcome": _outcome(call.status),
        "agent": _agents(call, service, urlsplit(service_url).hostname or ""),
        "source": {
            "site": call.service_id,
            "observer": service,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if call.status >= 400:
        event["outcomeDesc"] = f"HTTP {call.status}: {call.error or 'no reason recorded'}"[:1000]
    entities = _entities(call)
    if entities:
        event["entity"] = entities
    return event


def events(db: Database, service_url: str, since: datetime | None, until: datetime | None) -> Iterator[dict[str, Any]]:
    for call in read_calls(db, since, until):
        yield audit_event(call, service_url)


def ndjson(items: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for item in items:
        yield orjson.dumps(item) + b"\n"


def batch_bundle(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of PUTs by id: a second export of the same calls replaces the events instead of adding copies."""
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": item, "request": {"method": "PUT", "url": f"AuditEvent/{item['id']}"}} for item in items
        ],
    }


class ExportError(Exception):
    """The FHIR server did not take a batch (the message names the status, never the token)."""


@dataclass
class Sent:
    events: int = 0
    bundles: int = 0
    created: int = 0
    updated: int = 0


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _diagnostics(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    issues = body.get("issue") if isinstance(body, dict) else None
    texts = [str(i.get("diagnostics") or i.get("code") or "") for i in issues or [] if isinstance(i, dict)]
    return "; ".join(t for t in texts if t)[:300]


def post_batches(
    items: Iterable[dict[str, Any]], base_url: str, token: str | None, *, batch_size: int = 100, timeout: float = 60
) -> Sent:
    """POST the events to the FHIR server's base URL in batch Bundles; ExportError at the first batch not taken
    whole (the batches before it stay: exporting again replaces them)."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    sent = Sent()
    with requests.Session() as session:
        session.trust_env = False  # the token goes only to the URL given, never through an environment proxy
        for chunk in _chunks(items, batch_size):
            try:
                response = session.post(
                    base_url, data=orjson.dumps(batch_bundle(chunk)), headers=headers, timeout=timeout
                )
            except requests.RequestException as exc:
                raise ExportError(f"batch {sent.bundles + 1}: {type(exc).__name__}") from None
            if response.status_code != 200:
                detail = _diagnostics(response)
                raise ExportError(
                    f"batch {sent.bundles + 1}: the FHIR server answered {response.status_code}"
                    + (f" ({detail})" if detail else "")
                )
            entries = response.json().get("entry") or []
            statuses = [str((e.get("response") or {}).get("status") or "") for e in entries if isinstance(e, dict)]
            failed = [s for s in statuses if not s.startswith("2")]
            if len(statuses) != len(chunk) or failed:
                raise ExportError(
                    f"batch {sent.bundles + 1}: {len(failed) or len(chunk) - len(statuses)} of {len(chunk)} "
                    f"AuditEvents not stored ({', '.join(sorted(set(failed)))[:200] or 'entries missing'})"
                )
            sent.bundles += 1
            sent.events += len(chunk)
            sent.created += sum(1 for s in statuses if s.startswith("201"))
            sent.updated += sum(1 for s in statuses if s.startswith("200"))
    return sent
