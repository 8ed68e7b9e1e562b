"""The hook call route as a plain WSGI handler sharing the app's runtime: the hot path without Flask's request,
routing and response objects (issue 23); every other route, preflights included, stays with Flask."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from werkzeug.datastructures import EnvironHeaders

from ..audit import CallRecord, Identity
from ..auth.tokens import AuthError
from ..calls import answer
from ..engine import HookRequest, InvalidRequest, Service, parse_hook_request
from ..errors import BadRequest, ServiceError, operation_outcome
from ..ops import logs, metrics, tracing
from ..runtime import Runtime, Services
from .http import Cors, Headers, read_json, security_headers

log = logging.getLogger(__name__)

PREFIX = "/cds-services/"
_JSON: Headers = [("Content-Type", "application/json")]
# The audit log's column for it holds 200 characters; a longer "hookInstance" is not one a client would send.
_MAX_HOOK_INSTANCE = 200
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer ready to send: status, JSON body, and headers beyond Content-Type."""

    status: int
    body: bytes
    headers: Headers


def hook_call(rt: Runtime, service_id: str, environ: dict[str, Any]) -> Reply:
    """One hook call, from the WSGI environ to the reply: authenticate, parse once, judge, answer, audit.

    Never raises: a client's error is its status with an OperationOutcome, a bug a logged 500 without details.
    """
    try:
        return _hook_call(rt, service_id, environ)
    except ServiceError as exc:
        headers = [("WWW-Authenticate", 'Bearer realm="cds-services"')] if exc.status == 401 else []
        return Reply(exc.status, orjson.dumps(exc.to_dict()), headers)
    except Exception:
        log.exception("unhandled error on POST %s%s", PREFIX, service_id[:64])
        return Reply(500, orjson.dumps(operation_outcome("Internal error.", code="exception")), [])


def _hook_call(rt: Runtime, service_id: str, environ: dict[str, Any]) -> Reply:
    service = rt.policies.services.get(service_id)
    if service is None:
        raise ServiceError(404, f"No CDS service with id '{service_id[:64]}'; see GET /cds-services.")
    record = CallRecord(service_id=service_id, hook=service.hook)
    with tracing.call_span(record, EnvironHeaders(environ)), audited(rt, record):
        authenticate(rt, environ.get("HTTP_AUTHORIZATION"), PREFIX + service_id, record)
        with tracing.span(tracing.PARSE_SPAN):
            body = read_json(environ, rt.settings.max_body_bytes)
            # Known before the body is judged valid: a refused call's log line and audit record name it too.
            record.hook_instance = readable_hook_instance(body)
            hook_request = parse_or_400(body, service)
        record.hook_instance = hook_request.hook_instance
        record.user_id = hook_request.user_id
        record.patient_id = hook_request.patient_id
        outcome = answer(hook_request, service, rt.coverage, new_uuid=lambda: rt.card_id(service_id))
        record.answered(outcome)
        return Reply(200, orjson.dumps(outcome.response()), [])


def authenticate(rt: Runtime, authorization: str | None, path: str, record: CallRecord | None = None) -> Identity:
    """Check the caller's JWT when CDS_AUTH=jwt; on failure log why (never the token) and answer a bare 401."""
    if rt.authenticator is None:
        return Identity()
    try:
        identity = rt.authenticator.verify(authorization, rt.public_url + path)
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


def parse_or_400(body: Any, service: Service) -> HookRequest:
    try:
        return parse_hook_request(body, service)
    except InvalidRequest as exc:
        raise BadRequest(exc.message, expression=exc.expression) from None


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
    except Exception:
        record.failed(500, "internal error")
        raise
    finally:
        record.duration_ms = (time.perf_counter() - started) * 1000
        with tracing.span(tracing.AUDIT_SPAN):
            rt.audit.record(record)


class HookRoute:
    """WSGI middleware in front of the Flask app: POST /cds-services/{id} is answered here, everything else (feedback,
    discovery, preflights, other methods) goes on to Flask. Headers, errors, audit, metrics and log context are the
    ones the Flask routes give (web/http.py holds the shared rules)."""

    def __init__(self, parts: Services, flask_app: WsgiApp, cors: Cors) -> None:
        self.parts = parts
        self.flask_app = flask_app
        self.cors = cors  # the app's own, so both paths answer the same origins
        self.log_context = parts.runtime.settings.log_format == "json"

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(PREFIX):
            return self.flask_app(environ, start_response)
        service_id = path[len(PREFIX) :]
        if not service_id or "/" in service_id:  # feedback and unknown paths
            return self.flask_app(environ, start_response)
        rt = self.parts.runtime  # read once: a policy reload swaps it between calls, never within one
        if self.log_context:
            reply = self._with_log_context(rt, service_id, environ)
        else:
            reply = hook_call(rt, service_id, environ)
        headers = [*_JSON, ("Content-Length", str(len(reply.body))), *reply.headers]
        headers += security_headers(path, reply.status)
        headers += self.cors.headers(environ.get("HTTP_ORIGIN"))
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", headers)
        return [reply.body]

    def _with_log_context(self, rt: Runtime, service_id: str, environ: dict[str, Any]) -> Reply:
        """JSON logs: lines logged while the call is answered carry its service, hookInstance and status."""
        context, token = logs.begin_call(service_id if service_id in rt.policies.services else None)
        environ[logs.ENVIRON_KEY] = context  # the access log line names the call too
        status: int | None = None
        try:
            reply = hook_call(rt, service_id, environ)
            status = reply.status
            return reply
        finally:
            logs.end_call(token, status)
