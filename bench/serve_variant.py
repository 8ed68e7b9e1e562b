"""`cds-service serve` with gunicorn settings changed: the real command path, only the named options differ.

Usage: serve_variant.py [--set NAME=VALUE ...] -- SERVE_ARGS   (e.g. --set worker_class=sync -- --port 8080)
"""

from __future__ import annotations

import sys
from typing import Any


def parse_sets(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The --set NAME=VALUE pairs (ints converted) and the arguments after --."""
    settings: dict[str, Any] = {}
    rest = argv
    while rest and rest[0] == "--set":
        name, _, value = rest[1].partition("=")
        settings[name] = int(value) if value.lstrip("-").isdigit() else value
        rest = rest[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    return settings, rest


def main(argv: list[str]) -> int:
    settings, rest = parse_sets(argv)
    from cds_service import cli
    from cds_service.ops import server

    real_serve = server.serve

    def serve_with(app, **kwargs):  # type: ignore[no-untyped-def]
        # serve() applies `hooks` over its own options: the overrides go there.
        hooks = dict(kwargs.pop("hooks", None) or {})
        hooks.update(settings)
        real_serve(app, hooks=hooks, **kwargs)

    server.serve = serve_with  # cmd_serve imports serve at call time, so it gets this one
    return cli.main(["serve", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
