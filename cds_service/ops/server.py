"""`cds-service serve`: the production server (gunicorn) in the foreground, stopped cleanly by SIGTERM or SIGINT."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.gthread import ThreadWorker

from .call_pool import ElasticPool

# No version banner: gunicorn names itself in the Server header; name the service instead.
gunicorn_wsgi.SERVER = "cds-service"


def default_workers() -> int:
    return max(2, os.cpu_count() or 1)


def check_port_free(host: str, port: int) -> None:
    """OSError when another process listens on host:port. The workers bind with SO_REUSEPORT, which would let a
    second server share the port silently (and split the traffic); a plain bind here fails as it should."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        probe.bind((host, port))


class CallThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker with an elastic pool: `threads` run calls at once; up to `spare_threads` more
    stand in for calls waiting on a FHIR server (call_pool.ElasticPool)."""

    spare_threads = 16

    def get_thread_pool(self) -> ElasticPool:
        # gunicorn documents this method as the place to change the worker's thread pool.
        return ElasticPool(self.cfg.threads, self.spare_threads)


def worker_class(spare_threads: int) -> type[CallThreadWorker]:
    return type("CallThreadWorker", (CallThreadWorker,), {"spare_threads": spare_threads})


class Server(BaseApplication):  # type: ignore[misc]
    """gunicorn running an app built before forking, so a broken policy file stops start-up in the foreground."""

    def __init__(
        self, app: Flask, options: dict[str, Any], on_hup: Callable[[], object] | None = None, url: str = ""
    ) -> None:
        self.application = app
        self.options = options
        self.on_hup = on_hup
        self.url = url
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application

    def run(self) -> None:
        try:
            _Arbiter(self).run()
        except RuntimeError as exc:
            logging.getLogger("gunicorn.error").error("%s", exc)
            sys.exit(1)


# gunicorn's start-up line (arbiter.py), with the listeners and the master's pid.
_LISTENING = "Listening at: %s (%s)"


def listen_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Arbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's master, but SIGHUP reloads the policy files inside the running workers (reload.py) instead of
    restarting them: with reuse_port a worker's listening socket, and the connections queued on it, go with it."""

    def start(self) -> None:
        # With reuse_port the master opens no listening socket (each worker opens its own), so gunicorn's start-up
        # line would name none ("Listening at:  (pid)"): name the URL the workers listen on instead.
        url = self.app.url
        info = self.log.info

        def named_info(msg: str, *args: Any, **kwargs: Any) -> None:
            if msg == _LISTENING and args and not args[0] and url:
                args = (url, *args[1:])
            info(msg, *args, **kwargs)

        self.log.info = named_info
        try:
            super().start()
        finally:
            del self.log.info  # back to the class's method

    def handle_hup(self) -> None:
        on_hup = self.app.on_hup
        if on_hup is None:
            super().handle_hup()
            return
        self.log.info("SIGHUP: checking the policy files for a reload (workers keep running)")
        on_hup()


def serve(
    app: Flask,
    *,
    host: str,
    port: int,
    workers: int,
    threads: int,
    log_level: str,
    hooks: dict[str, Any] | None = None,
    on_hup: Callable[[], object] | None = None,
    spare_threads: int = CallThreadWorker.spare_threads,
) -> None:
    """Serve `app` with gunicorn until SIGTERM/SIGINT; `hooks` are gunicorn server hooks and options the app's parts
    contribute, `on_hup` replaces gunicorn's SIGHUP restart (the service reloads its policies instead);
    `spare_threads` stand in for calls waiting on a FHIR server (CDS_FHIR_MAX_READS)."""
    options: dict[str, Any] = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        # Threads, not sync workers: a call waiting on the client's FHIR server (CRD Coverage read, up to
        # CDS_FHIR_TIMEOUT) must not stop the worker's other calls; sync workers fell to 31 req/s with a slow FHIR
        # server. `threads` (2 by default) compute at once (bench/README.md): CPU-bound calls share the GIL with
        # one other call, not three (p99 31 vs 57 ms at 8 connections). A call waiting on a FHIR server steps
        # aside and a spare thread serves the next call: up to CDS_FHIR_MAX_READS of them, as many as the reads
        # the worker lets run at once (with 2 fixed threads, 2 slow reads on one worker stalled its other calls
        # for seconds: bench/slow_fhir.py).
        "worker_class": worker_class(spare_threads),
        "threads": threads,
        # One listening socket per worker (SO_REUSEPORT) so the kernel spreads connections over the workers. With
        # the shared socket, the worker that wins accept() keeps every keep-alive connection it took: measured,
        # one worker busy and the other idle in most runs.
        "reuse_port": True,
        # gunicorn 27 opens a control socket at one path per user, shared by every gunicorn on the machine; the
        # service does not use it.
        "control_socket_disable": True,
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
    options.update(hooks or {})
    # Everything built so far (policies, compiled patterns, FHIR models) lives as long as the process: move it out
    # of the garbage collector's sight, so workers neither scan it (long gen-2 pauses) nor copy it on write.
    gc.freeze()
    Server(app, options, on_hup, listen_url(host, port)).run()
