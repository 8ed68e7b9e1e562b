"""The `cds-service` command: serve, evaluate a request file, check the policy files."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from . import config as config_module
from .calls import answer
from .engine import InvalidRequest, Outcome, PolicyError, Service, describe, parse_hook_request, parse_json
from .engine.examples import ExampleReport, run_examples
from .engine.policy import PolicySet, check_policies, json_schema, language_json_schema, packaged_policy_dir
from .errors import BadRequest, ServiceError
from .runtime import build_runtime, services_of

# Subcommands added by other modules (storage: db, audit, report) register here.
Registrar = Callable[[argparse._SubParsersAction], None]  # type: ignore[type-arg]
EXTRA_COMMANDS: list[Registrar] = []


def _out(text: str, stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(text + "\n")


def _fail(message: str, code: int = 1) -> int:
    _out(f"cds-service: {message}", sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from .ops.logs import configure
    from .ops.operate import serving

    try:
        settings = config_module.load()
    except config_module.ConfigError as exc:
        return _fail(str(exc), 2)
    # Before anything logs: in JSON mode every line on stdout and stderr is a JSON object, this one's too.
    configure(settings.log_format, "INFO")
    with serving(settings) as private_dir:
        return _serve(args, private_dir)


def _serve(args: argparse.Namespace, private_dir: str) -> int:
    from .ops.server import check_port_free, default_workers, serve
    from .web.app import create_app

    try:
        app = create_app()
    except (PolicyError, config_module.ConfigError) as exc:
        return _fail(str(exc), 2)
    parts = services_of(app)
    try:
        parts.store.prepare_serve()
    except RuntimeError as exc:
        return _fail(str(exc), 2)
    try:
        check_port_free(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", 2)
    # SIGHUP reloads the policy files through snapshots in the run's private folder (reload.py).
    parts.reloader.serve_from(private_dir)
    settings = parts.runtime.settings
    serve(
        app,
        host=args.host,
        port=args.port,
        workers=args.workers or default_workers(),
        threads=args.threads,
        log_level=settings.log_level,
        hooks=parts.server_hooks,
        on_hup=parts.reloader.reload,
        spare_threads=settings.fhir_max_reads,
    )
    return 0


def _read_request(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _service_for(body: Any, services: dict[str, Service], wanted: str | None) -> Service:
    if wanted:
        if wanted not in services:
            raise ServiceError(404, f"no service {wanted!r}; services: {', '.join(services)}")
        return services[wanted]
    hook = body.get("hook") if isinstance(body, dict) else None
    for service in services.values():
        if service.hook == hook:
            return service
    raise ServiceError(400, f"no service answers hook {hook!r}")


def explain(result: Outcome, stream: TextIO) -> None:
    """For every ServiceRequest judged: the verdict, the rule that decided it, and the evidence."""
    if not result.verdicts:
        _out("No ServiceRequest was judged (none in draftOrders, or none selected).", stream)
    for verdict in result.verdicts:
        _out(describe(verdict), stream)
    if result.notes:
        _out("Notes:", stream)
        for note in result.notes:
            _out(f"  - {note}", stream)


def cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        settings = config_module.load({"AUTH": "off"} | ({"POLICY_DIR": args.policy_dir} if args.policy_dir else {}))
        rt = build_runtime(settings, offline=not args.fetch)
    except (PolicyError, config_module.ConfigError) as exc:
        return _fail(str(exc), 2)
    try:
        body = parse_json(_read_request(args.file))
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}", 2)
    except InvalidRequest as exc:
        return _fail(f"{args.file}: {exc.message}", 2)
    try:
        service = _service_for(body, rt.policies.services, args.service)
        try:
            hook_request = parse_hook_request(body, service)
        except InvalidRequest as exc:
            raise BadRequest(exc.message, expression=exc.expression) from None
        result = answer(hook_request, service, rt.coverage)
    except ServiceError as exc:
        _out(orjson.dumps(exc.to_dict(), option=orjson.OPT_INDENT_2).decode(), sys.stderr)
        return _fail(f"the request would be refused with HTTP {exc.status}: {exc.message}")
    if args.explain:
        explain(result, sys.stdout)
    else:
        _out(orjson.dumps(result.response(), option=orjson.OPT_INDENT_2).decode())
    return 0


def _report_examples(policies: PolicySet, report: ExampleReport) -> None:
    positives = sum(1 for j in report.judged if j.example.positive)
    _out(
        f"examples: {len(report.judged)} ({positives} to flag, {len(report.judged) - positives} not); "
        f"precision {report.precision:.3f}, recall {report.recall:.3f}"
    )
    for judged in report.misjudged:
        example = judged.example
        wanted = "flagged" if example.positive else "not flagged"
        rule = f" by rule {example.rule}" if example.rule else ""
        _out(f"MISJUDGED {example.source.name} {example.id}: should be {wanted}{rule}: {example.why}")
        for verdict in judged.verdicts:
            _out("\n".join("    " + line for line in describe(verdict).splitlines()))


def cmd_check_policy(args: argparse.Namespace) -> int:
    """Validate every policy file and run the labelled examples; list every problem, exit 1 on any."""
    folder = Path(args.dir or os.environ.get("CDS_POLICY_DIR") or packaged_policy_dir())
    policies, problems = check_policies(folder)
    for problem in problems:
        _out(f"ERROR {problem}")
    if policies is None:
        _out(f"policy check failed: {len(problems)} problem(s) in {folder}", sys.stderr)
        return 1
    for policy in policies.policies:
        _out(
            f"ok  {policy.source}: {policy.id} {policy.version} ({policy.title}); {len(policy.rules)} rules, "
            f"alternatives for {', '.join(policy.alternatives) or 'none'}; sha256 {policy.sha256[:12]}"
        )
    for service in policies.services.values():
        _out(f"    service {service.id} on {service.hook}: {', '.join(p.id for p in service.policies)}")
    examples = folder / "examples"
    if not examples.is_dir():
        _out(f"no labelled examples ({examples} does not exist)")
        return 0
    report = run_examples(policies, examples)
    for problem in report.problems:
        _out(f"ERROR {problem}")
    _report_examples(policies, report)
    failed = len(report.problems) + len(report.misjudged)
    if failed:
        _out(
            f"policy check failed: {len(report.problems)} example problem(s), {len(report.misjudged)} misjudged",
            sys.stderr,
        )
        return 1
    return 0


def cmd_policy_schema(args: argparse.Namespace) -> int:
    """The JSON Schema of the policy format, or of a language file (for editors: yaml-language-server, VS Code)."""
    schema = language_json_schema() if args.language else json_schema()
    _out(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the production server (gunicorn) in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core, min 2)")
    serve.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads per worker computing calls at once (default 2); calls waiting on a FHIR server do not count",
    )
    serve.set_defaults(func=cmd_serve)

    ev = sub.add_parser("evaluate", help="print the response the service would give to a request file")
    ev.add_argument("file", help="a CDS Hooks request (JSON); - reads standard input")
    ev.add_argument(
        "--explain",
        action="store_true",
        help="instead of the response, print each ServiceRequest's verdict with the evidence for and against it",
    )
    ev.add_argument("--service", help="service id (default: the service for the request's hook)")
    ev.add_argument(
        "--fetch",
        action="store_true",
        help="read missing prefetch data (the Coverage) from the request's fhirServer, as the service "
        "does; by default evaluation is offline and uses the request's prefetch only",
    )
    ev.add_argument("--policy-dir", help="policy folder (default: CDS_POLICY_DIR or the packaged policies/)")
    ev.set_defaults(func=cmd_evaluate)

    check = sub.add_parser(
        "check-policy", help="validate the policy files, run their labelled examples, and list every problem"
    )
    check.add_argument("dir", nargs="?", help="policy folder (default: CDS_POLICY_DIR or the packaged policies/)")
    check.set_defaults(func=cmd_check_policy)

    schema = sub.add_parser("policy-schema", help="print the JSON Schema of the policy file format")
    schema.add_argument(
        "--language", action="store_true", help="the schema of a language file (languages/<code>.yaml) instead"
    )
    schema.set_defaults(func=cmd_policy_schema)

    from .store.commands import register as register_store_commands

    register_store_commands(sub)
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
