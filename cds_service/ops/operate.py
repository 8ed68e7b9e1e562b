"""What operations need, wired into the app: /metrics, the call's log context, live policy reload, /health fields."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request

from ..audit import AuditSink, CallRecord
from ..config import Settings
from ..errors import ServiceError
from . import logs, metrics, tracing
from .reload import PolicyReloader

if TYPE_CHECKING:
    from ..runtime import Services

log = logging.getLogger(__name__)

# The endpoints that answer a call (a hook or its feedback): their log lines carry the call's fields.
CALL_ENDPOINTS = frozenset({"cds.call_service", "cds_feedback.post_feedback"})


class ObservedAudit:
    """The audit sink, seen on the way: every call's record feeds the metrics and its log context."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner

    def record(self, call: CallRecord) -> None:
        metrics.observe_call(call)
        logs.bind_call(hook_instance=call.hook_instance, status=call.status)
        self.inner.record(call)


def install(app: Flask, parts: Services, started: float) -> None:
    """Called by create_app once the Services exist: the reloader, /metrics, JSON log context, server hooks."""
    settings = parts.runtime.settings
    # Traces when the OTEL_* variables ask for them (tracing.wanted); a ConfigError stops start-up.
    tracing.setup()
    m = metrics.current()
    parts.reloader = reloader = PolicyReloader(parts, settings.policy_dir)
    if m is not None:
        m.last_reload_ok.set(1)
    reloader.loaded(time.monotonic() - started)

    if m is not None:
        _install_metrics_endpoint(app, m, settings.metrics_token)
    if settings.log_format == "json":
        _install_call_context(app, parts)

    hooks: dict[str, Any] = {
        "post_fork": lambda _server, _worker: m.after_fork() if m is not None else None,
        "post_worker_init": lambda _worker: reloader.start_watching(),
        "child_exit": lambda _server, worker: metrics.mark_process_dead(worker.pid),
        # A worker's last spans are still batched when it stops: send them first.
        "worker_exit": lambda _server, _worker: tracing.flush(),
    }
    options = combine_hooks(parts.store.server_hooks(), hooks)
    if settings.log_format == "json":
        options["logger_class"] = logs.GunicornJsonLogger
    if settings.access_log:
        options["accesslog"] = "-"
    parts.server_hooks = options


def observed(settings: Settings) -> Callable[[AuditSink], AuditSink]:
    """Turn the metrics on or off for this process and wrap the audit sink so every record feeds them."""
    metrics.install(metrics.Metrics() if settings.metrics else None)
    return ObservedAudit


def combine_hooks(*sources: dict[str, Any]) -> dict[str, Any]:
    """gunicorn server hooks from several parts: each hook runs every part's function, in order."""
    combined: dict[str, list[Callable[..., Any]]] = {}
    for source in sources:
        for name, fn in source.items():
            combined.setdefault(name, []).append(fn)

    def chain(name: str, functions: list[Callable[..., Any]]) -> Callable[..., None]:
        # gunicorn checks a hook's number of parameters: the chain must take exactly what the hook is given.
        if name in _ONE_ARGUMENT_HOOKS:

            def run_one(worker: Any) -> None:
                for fn in functions:
                    fn(worker)

            return run_one

        def run_two(server: Any, worker: Any) -> None:
            for fn in functions:
                fn(server, worker)

        return run_two

    return {name: fns[0] if len(fns) == 1 else chain(name, fns) for name, fns in combined.items()}


# gunicorn's server hooks that take only the worker; the others used here (post_fork, worker_exit, child_exit, pre_fork)
# take the arbiter and the worker.
_ONE_ARGUMENT_HOOKS = frozenset({"post_worker_init", "worker_int", "worker_abort"})


def _install_metrics_endpoint(app: Flask, m: metrics.Metrics, token: str | None) -> None:
    expected = f"Bearer {token}".encode() if token else None

    def scrape() -> Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").strip().encode()
            # Constant-time: the comparison must not tell how much of a guessed token was right.
            if not hmac.compare_digest(given, expected):
                raise ServiceError(401, "Unauthorized.", code="login")
        body, content_type = m.exposition()
        response = Response(body, status=200)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-store"
        return response

    app.add_url_rule("/metrics", "metrics", scrape, methods=["GET"])


def _install_call_context(app: Flask, parts: Services) -> None:
    """JSON logs: lines logged while a call is answered carry its service, hookInstance and status."""

    @app.before_request
    def begin() -> None:
        if request.method != "POST" or request.endpoint not in CALL_ENDPOINTS:  # not a CORS preflight
            return
        service_id = (request.view_args or {}).get("service_id")
        known = service_id in parts.runtime.policies.services
        context, token = logs.begin_call(service_id if known else None)
        request.environ[logs.ENVIRON_KEY] = context
        request.environ["cds.call_token"] = token

    @app.after_request
    def answered(response: Response) -> Response:
        token = request.environ.pop("cds.call_token", None)
        if token is not None:
            logs.end_call(token, response.status_code)
        return response

    @app.teardown_request
    def finished(_exc: BaseException | None) -> None:
        token = request.environ.pop("cds.call_token", None)
        if token is not None:  # after_request did not run: an error escaped
            logs.end_call(token, None)


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """`serve`: a private folder for the run (metrics files, policy snapshots), removed by the process that made it.

    gunicorn's workers leave through sys.exit inside this block; they must not remove what the master still uses.
    """
    folder = metrics.private_dir()
    owner = os.getpid()
    try:
        if settings.metrics:
            metrics.prepare_multiprocess_dir(folder)
        yield folder
    finally:
        if os.getpid() == owner:
            metrics.remove_private_dir(folder)
