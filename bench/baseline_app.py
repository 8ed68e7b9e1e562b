"""The yardstick: bare Flask that parses the JSON body and answers 2 KB of JSON, served like `cds-service serve`.

It is started through cds_service.ops.server.serve (the same gunicorn options: worker class, workers, threads,
keep-alive, preload) so the ratio service/baseline measures the service's own work and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flask import Flask, Response, request

# A 2 KB answer shaped like a CDS Hooks response (one card), built once.
_CARD = {
    "uuid": "8b0a5e0c-2f0e-4c5d-9d0a-2b1c3d4e5f60",
    "summary": "Baseline card: the same shape as a real answer, none of the work",
    "indicator": "info",
    "detail": "x" * 1500,
    "source": {"label": "bench baseline", "url": "https://bench.example.org"},
}
ANSWER: dict[str, Any] = {"cards": [_CARD], "systemActions": []}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 5 * 1024 * 1024

    @app.post("/cds-services/<service_id>")
    def call(service_id: str) -> Any:
        body = request.get_json(force=True)  # Flask's own JSON: the bare-Flask cost of reading the body
        if not isinstance(body, dict):
            return Response("{}", status=400, mimetype="application/json")
        return ANSWER

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    from serve_variant import parse_sets

    from cds_service.cli import build_parser
    from cds_service.config import DEFAULTS
    from cds_service.ops.server import default_workers, serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=None, help="default: what `cds-service serve` uses")
    parser.add_argument("--threads", type=int, default=None, help="default: what `cds-service serve` uses")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a gunicorn setting")
    args = parser.parse_args(argv)
    serve_defaults = build_parser().parse_args(["serve"])
    app = create_app()
    overrides, _ = parse_sets([item for pair in args.set for item in ("--set", pair)])
    serve(
        app,
        host=args.host,
        port=args.port,
        workers=args.workers or serve_defaults.workers or default_workers(),
        threads=args.threads or serve_defaults.threads,
        log_level=str(DEFAULTS["LOG_LEVEL"]),
        hooks=overrides,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
