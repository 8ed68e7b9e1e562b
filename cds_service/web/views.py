"""HTTP endpoints: discovery, the hook services, health; thin views over the domain code."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..audit import CallRecord, Identity
from ..auth.tokens import AuthError
from ..calls import answer
from ..engine import HookRequest, InvalidRequest, Service, parse_hook_request, parse_json
from ..errors import BadRequest, ServiceError
from ..ops import metrics, tracing
from ..runtime import Runtime, services_of

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)


def runtime() -> Runtime:
    return services_of(current_app).runtime


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


# JSON nesting limit: what orjson can encode again (254 levels; its decoder allows 1024). Every accepted body can
# then be re-serialised whole (CRD echoes, audit, feedback storage) and walked by recursive Python code (254 levels
# stay far below the interpreter's recursion limit of 1000). Real CDS Hooks requests nest fewer than 20 levels.


def require_json_content_type() -> None:
    """415 for a body declared as anything but JSON; a missing Content-Type is read as JSON.

    CDS Hooks 2.0 calls and feedback are "application/json"; FHIR's "application/fhir+json" and any other "+json"
    type (RFC 6839 structured syntax suffix) are JSON too, with or without parameters such as charset. A text/plain
    or form body is what a browser may send cross-origin without a CORS preflight: refusing it keeps such a page
    from calling the service unasked. (Flask's own get_json refuses non-JSON types the same way.)
    """
    if not request.content_type:
        return
    mimetype = request.mimetype  # lower case, parameters removed
    if mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json")):
        return
    raise ServiceError(
        415,
        f"The request body must be JSON (Content-Type application/json), not {request.mimetype[:100]!r}.",
        expression="Content-Type",
    )


def read_json() -> Any:
    """The request body as JSON: 415 when declared as another type, 413 over the size limit (before parsing), 400
    when it is not JSON or too deep."""
    require_json_content_type()
    data = request.get_data(cache=False)  # 413 when Content-Length is over MAX_CONTENT_LENGTH, before reading
    limit = request.max_content_length
    # A streamed (chunked) body is cut at the limit without an error (werkzeug's LimitedStream.readall stops there):
    # one more byte from the server's stream tells a body of exactly the limit from a longer one.
    streamed_to_limit = request.content_length is None and limit is not None and len(data) >= limit
    if streamed_to_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    try:
        return parse_json(data)
    except InvalidRequest as exc:
        raise BadRequest(exc.message, expression=exc.expression) from None


def authenticate(rt: Runtime, path: str, record: CallRecord | None = None) -> Identity:
    """Check the caller's JWT when CDS_AUTH=jwt; on failure log why (never the token) and answer a bare 401."""
    if rt.authenticator is None:
        return Identity()
    try:
        identity = rt.authenticator.verify(request.headers.get("Authorization"), rt.public_url + path)
    except AuthError as exc:
        metrics.jwt_refused(exc.reason)
        who = exc.identity
        # The reason and the token's (sanitised) iss, kid, jti and tenant; never the token itself.
        log.warning(
            "401 for %s: %s (iss=%s kid=%s jti=%s tenant=%s)", path, exc.reason, who.iss, who.kid, who.jti, who.tenant
        )
        if record is not None:
            record.iss, record.jti, record.tenant = who.iss, who.jti, who.tenant
            record.error = f"authentication failed: {exc.reason}"
        raise ServiceError(401, "Unauthorized.", code="login") from None
    if record is not None:
        record.iss, record.jti, record.tenant = identity.iss, identity.jti, identity.tenant
    return identity


@bp.get("/cds-services")
def discovery() -> Response:
    rt = runtime()
    return json_response({"services": rt.discovery})


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    rt = runtime()
    service = rt.policies.services.get(service_id)
    if service is None:
        raise ServiceError(404, f"No CDS service with id '{service_id[:64]}'; see GET /cds-services.")
    record = CallRecord(service_id=service_id, hook=service.hook)
    with tracing.call_span(record, request.headers), audited(rt, record):
        authenticate(rt, f"/cds-services/{service_id}", record)
        with tracing.span(tracing.PARSE_SPAN):
            body = read_json()
            # Known before the body is judged valid: a refused call's log line and audit record name it too.
            record.hook_instance = readable_hook_instance(body)
            hook_request = parse_or_400(body, service)
        record.hook_instance = hook_request.hook_instance
        record.user_id = hook_request.user_id
        record.patient_id = hook_request.patient_id
        outcome = answer(hook_request, service, rt.coverage, new_uuid=lambda: rt.card_id(service_id))
        record.answered(outcome)
        return json_response(outcome.response())


def parse_or_400(body: Any, service: Service) -> HookRequest:
    try:
        return parse_hook_request(body, service)
    except InvalidRequest as exc:
        raise BadRequest(exc.message, expression=exc.expression) from None


# The audit log's column for it holds 200 characters; a longer "hookInstance" is not one a client would send.
_MAX_HOOK_INSTANCE = 200


def readable_hook_instance(body: Any) -> str | None:
    """The body's hookInstance when it is a non-empty string of printable characters (at most 200), else None."""
    value = body.get("hookInstance") if isinstance(body, dict) else None
    if isinstance(value, str) and 0 < len(value) <= _MAX_HOOK_INSTANCE and value.isprintable():
        return value
    return None


@contextmanager
def audited(rt: Runtime, record: CallRecord) -> Iterator[CallRecord]:
    """Every call leaves one audit record, answered or refused (CRD found-37: every hook invocation and response is
    logged): a refusal's status and reason (a 401's reason was set by authenticate), or the answer's outcome."""
    started = time.perf_counter()
    try:
        yield record
    except ServiceError as exc:
        record.failed(exc.status, exc.message)
        raise
    except HTTPException as exc:  # 413 from the body limit
        record.failed(exc.code or 500, exc.name)
        raise
    except Exception:
        record.failed(500, "internal error")
        raise
    finally:
        record.duration_ms = (time.perf_counter() - started) * 1000
        with tracing.span(tracing.AUDIT_SPAN):
            rt.audit.record(record)


@bp.get("/health")
def health() -> Response:
    parts = services_of(current_app)
    rt = parts.runtime
    body: dict[str, Any] = {"status": "ok"}
    body.update(parts.health())
    # This worker's FHIR reads and circuit breakers (each worker keeps its own): a client's failing FHIR server
    # degrades its calls (no Coverage read), not this service's health, so the status stays as it is.
    body.update(rt.coverage.reader.health())
    return json_response(body)
