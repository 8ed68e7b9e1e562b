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
from .hook_route import HookRoute
from .http import Cors, security_headers, too_large
from .views import bp, json_response

log = logging.getLogger(__name__)


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
    cors = Cors(settings.cors_origins)
    _install_cors(app, cors)
    _install_errors(app)
    app.after_request(_security_headers)
    # The hook calls skip Flask (its request, routing and response objects): the hot path of every order entry.
    app.wsgi_app = HookRoute(parts, app.wsgi_app, cors)  # type: ignore[method-assign]
    return app


def _security_headers(response: Response) -> Response:
    for name, value in security_headers(request.path, response.status_code):
        response.headers[name] = value
    return response


def _install_cors(app: Flask, cors: Cors) -> None:
    """CORS on the Flask routes (web/http.py's rules); preflights are answered here, before authentication."""

    @app.before_request
    def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        response = Response(status=204)
        response.headers.pop("Content-Type", None)
        if cors.allowed_origin(request.headers.get("Origin")):
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.after_request
    def cors_headers(response: Response) -> Response:
        for name, value in cors.headers(request.headers.get("Origin")):
            if name == "Vary":
                response.vary.add(value)
            else:
                response.headers[name] = value
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
            413: too_large(request.max_content_length or 0),
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
