"""HTTP endpoints: discovery, the hook services, health; thin views over the domain code."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request

from ..audit import Identity
from ..runtime import Runtime, services_of
from . import hook_route, http
from .hook_route import hook_call

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)


def runtime() -> Runtime:
    return services_of(current_app).runtime


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


@bp.get("/cds-services")
def discovery() -> Response:
    rt = runtime()
    return json_response({"services": rt.discovery})


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    """The hook call when the app is served without its HookRoute in front (which answers these itself)."""
    reply = hook_call(runtime(), service_id, request.environ)
    return Response(reply.body, status=reply.status, headers=reply.headers, mimetype="application/json")


def read_json() -> Any:
    """The Flask request's body as JSON (web/http.py's rules: 415, 413, 400)."""
    return http.read_json(request.environ, runtime().settings.max_body_bytes)


def authenticate(rt: Runtime, path: str) -> Identity:
    """The Flask request's caller (hook_route.authenticate's rules: a bare 401, never the token logged)."""
    return hook_route.authenticate(rt, request.headers.get("Authorization"), path)


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
