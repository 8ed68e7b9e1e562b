"""The Flask application factory: settings, policies, the long-lived parts, CORS, security headers, JSON errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, InternalServerError

from .. import config as config_module
from ..config import Settings
from ..errors import ServiceError, issue_type, operation_outcome
from ..ops.operate import install as install_operations
from ..ops.operate import observed
from ..runtime import Services, attach, build_runtime
from ..store import open_store
from .feedback_views import bp as feedback_bp
from .views import bp, json_response

log = logging.getLogger(__name__)

# Paths whose answers hold patient-specific guidance: never cached (service calls and feedback).
_NO_STORE_PREFIX = "/cds-services/"


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. `config` takes the CDS_* setting names without the prefix and wins over the environment."""
    started = time.monotonic()
    settings = Settings.load(config)
    app = Flask(
        config_module.FLASK_IMPORT_NAME,
        root_path=str(Path(__file__).parent),
        instance_path=config_module.instance_folder(),
        instance_relative_config=True,
    )
    app.config.update(settings.as_config())  # read-only view for Flask extensions; the code reads `settings`
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]

    # The database (audit log, feedback, jti store): nothing connects until first use, in the process using it.
    store = open_store(settings, app.instance_path)
    parts = Services(runtime=build_runtime(settings, store=store, observe=observed(settings)), store=store)
    attach(app, parts)

    app.register_blueprint(bp)
    app.register_blueprint(feedback_bp)
    # /metrics, JSON log context, live policy reload and the /health fields they add (operate.py).
    install_operations(app, parts, started)
    _install_cors(app, settings.cors_origins)
    _install_errors(app)
    app.after_request(_security_headers)
    return app


def _security_headers(response: Response) -> Response:
    """Headers a security review expects on a JSON API: no sniffing, no framing, no caching of patient guidance."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    # JSON is never a document to render: nothing may load from it or frame it if a browser opens it anyway.
    response.headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'none'"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.path.startswith(_NO_STORE_PREFIX) or response.status_code >= 400:
        response.headers["Cache-Control"] = "no-store"
    return response


def _install_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """CORS for browser clients (the CDS Hooks sandbox): listed origins only, errors included, no credentials.

    CDS Hooks authenticates with a bearer JWT, not cookies, so Allow-Credentials is never sent; that is what makes
    a configured "*" safe. Preflights are answered before authentication: browsers send them without the JWT.
    """
    allowed = {o.lower() for o in origins}
    any_origin = "*" in allowed

    def allowed_origin() -> str | None:
        origin = request.headers.get("Origin")
        if not origin:
            return None
        if any_origin:
            return "*"
        # Echo the origin exactly as the browser sent it; compare as browsers serialise it (lower case).
        return origin if origin.lower() in allowed else None

    @app.before_request
    def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        response = Response(status=204)
        response.headers.pop("Content-Type", None)
        origin = allowed_origin()
        if origin:
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.after_request
    def cors_headers(response: Response) -> Response:
        if allowed and not any_origin:
            # The answer differs by Origin: a shared cache must not hand one origin's answer to another.
            response.vary.add("Origin")
        origin = allowed_origin()
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
        return response


def _install_errors(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> Response:
        response = json_response(exc.to_dict(), exc.status)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cds-services"'
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        messages = {
            404: "Not found: see GET /cds-services for the services.",
            405: f"Method {request.method} is not allowed here.",
            413: "The request body is too large (limit 5 MB).",
        }
        message = messages.get(status, exc.description or exc.name)
        response = json_response(operation_outcome(message, code=issue_type(status)), status)
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(InternalServerError)
    def internal_error(exc: InternalServerError) -> Response:
        # A bug, not a client error: log it with its traceback, answer without one.
        original = exc.original_exception or exc
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=original)
        return json_response(operation_outcome("Internal error.", code="exception"), 500)
