"""`cds-service serve`: the production server (gunicorn) in the foreground, stopped cleanly by SIGTERM or SIGINT."""

from __future__ import annotations

import gc
import os
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.http import wsgi as gunicorn_wsgi

# No version banner: gunicorn names itself in the Server header; name the service instead.
gunicorn_wsgi.SERVER = "cds-service"


def default_workers() -> int:
    return max(2, os.cpu_count() or 1)


class Server(BaseApplication):  # type: ignore[misc]
    """gunicorn running an app built before forking, so a broken policy file stops start-up in the foreground."""

    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def serve(app: Flask, *, host: str, port: int, workers: int, threads: int, log_level: str) -> None:
    options: dict[str, Any] = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "preload_app": True,
        "graceful_timeout": 20,
        "timeout": 30,
        "keepalive": 5,
        "loglevel": log_level.lower(),
        "errorlog": "-",
        "accesslog": None,
        # Hooks answer small JSON; a few MB of headers or a request line of a megabyte are an attack.
        "limit_request_line": 8190,
        "limit_request_fields": 100,
    }
    hooks = app.extensions.get("cds_server_hooks", {})
    options.update(hooks)
    # Everything built so far (policies, compiled patterns, FHIR models) lives as long as the process: move it out
    # of the garbage collector's sight, so workers neither scan it (long gen-2 pauses) nor copy it on write.
    gc.freeze()
    Server(app, options).run()
