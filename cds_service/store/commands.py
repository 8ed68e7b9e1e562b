"""The storage subcommands of `cds-service`: db upgrade, audit purge, audit replay-spill, report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from .. import config as config_module
from ..config import Settings
from . import Store, open_store
from .db import SchemaTooNew, StoreUnavailable, safe_url
from .maintenance import parse_age, purge
from .report import FALSE_ALARM_CODES, build_report, possible_miss_examples, render_csv, render_json, render_text


def _say(text: str, *, error: bool = False) -> None:
    (sys.stderr if error else sys.stdout).write(text + "\n")


def instance_path() -> str:
    """The same instance folder the app uses."""
    return config_module.instance_folder()


def _store() -> Store:
    settings = config_module.load({"AUDIT": False})
    return open_store(settings, instance_path())


def parse_since(text: str) -> datetime:
    """YYYY-MM-DD (midnight UTC) or an ISO 8601 date-time (UTC when it has no offset)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date such as 2026-10-01, got {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    store = _store()
    try:
        before, after = store.upgrade()
    except (StoreUnavailable, SchemaTooNew) as exc:
        _say(f"cds-service: cannot upgrade {safe_url(store.db.url)}: {exc}", error=True)
        return 1
    finally:
        store.db.dispose()
    if before == after:
        _say(f"{safe_url(store.db.url)}: schema already at {after}")
    else:
        _say(f"{safe_url(store.db.url)}: schema upgraded from {before or 'empty'} to {after}")
    return 0


def cmd_audit_purge(args: argparse.Namespace) -> int:
    store = _store()
    try:
        store.ensure_schema()
        counts = purge(store.db, args.older_than)
    except (StoreUnavailable, SchemaTooNew) as exc:
        _say(f"cds-service: {exc}", error=True)
        return 1
    finally:
        store.db.dispose()
    _say(
        f"purged records older than {counts['cutoff']}: {counts['calls']} calls, {counts['cards']} cards, "
        f"{counts['feedback']} feedback items; {counts['expiredJtis']} expired token ids"
    )
    return 0


@dataclass
class PolicyFacts:
    """What the report takes from the policies the service uses (empty when they do not load)."""

    # Override reasons' displays by (system, code).
    reason_displays: dict[tuple[str, str], str] = field(default_factory=dict)
    # Per policy id, the rules marked `review: true` now (for audit records written before the mark was kept).
    review_rules: dict[str, frozenset[str]] = field(default_factory=dict)
    # Per policy id, the code system URI of each system name evidence labels show ("CPT" -> the CPT URI).
    systems: dict[str, dict[str, str]] = field(default_factory=dict)


def policy_facts(settings: Settings) -> PolicyFacts:
    from ..engine import PolicyError, load_policies
    from ..engine.evidence import system_name

    try:
        policies = load_policies(settings.policy_dir)
    except (PolicyError, OSError) as exc:
        _say(
            "cds-service: override reasons are shown by code only and possible misses use the rules marked in the "
            f"audit log only; the policies did not load: {exc}",
            error=True,
        )
        return PolicyFacts()
    return PolicyFacts(
        reason_displays={(r.system, r.code): r.display for p in policies.policies for r in p.card.override_reasons},
        review_rules={p.id: frozenset(r.id for r in p.rules if r.review) for p in policies.policies},
        systems={
            p.id: {system_name(alias): uri for alias, uri in p.recognition.canonical_system.items()}
            for p in policies.policies
        },
    )


def reason_displays(settings: Settings) -> dict[tuple[str, str], str]:
    """Override reasons' displays by (system, code), from the policies the service uses; none if they do not load."""
    return policy_facts(settings).reason_displays


def cmd_audit_replay_spill(args: argparse.Namespace) -> int:
    store = _store()
    folder = args.dir or store.spill_dir
    try:
        result = store.replay_spill(folder)
    except (StoreUnavailable, SchemaTooNew) as exc:
        _say(f"cds-service: {exc}", error=True)
        return 1
    finally:
        store.db.dispose()
    _say(
        f"{folder}: {result.files} spill files written to {safe_url(store.db.url)} and removed: {result.records} "
        f"records, {result.inserted} new, {result.records - result.inserted} already stored"
        + (f"; {result.rejected_lines} lines that are not records kept as *.rejected" if result.rejected_lines else "")
        + (f"; {result.skipped_files} files still being written, left alone" if result.skipped_files else "")
        + (f"; {result.failed_files} files the database refused, kept" if result.failed_files else "")
    )
    return 1 if result.failed_files else 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.possible_misses and args.format != "json":
        _say(
            "cds-service: --possible-misses writes labelled examples (policies/examples/*.json): add --format json",
            error=True,
        )
        return 2
    render = {"text": render_text, "json": render_json, "csv": render_csv}.get(args.format)
    if render is None:  # html: the charting library is an optional extra; say which before reading anything
        try:
            from .report_html import render_html
        except ImportError as exc:
            _say(
                f"cds-service: --format html needs the extra 'report': pip install 'cds-service[report]' ({exc})",
                error=True,
            )
            return 2
        render = render_html
    store = _store()
    try:
        store.ensure_schema()
        codes = tuple(args.false_alarm_reason or FALSE_ALARM_CODES)
        facts = policy_facts(config_module.load({"AUDIT": False}))
        report = build_report(
            store.db,
            since=args.since,
            until=args.until,
            reason_displays=facts.reason_displays,
            false_alarm_codes=codes,
            review_rules=facts.review_rules,
        )
    except (StoreUnavailable, SchemaTooNew) as exc:
        _say(f"cds-service: {exc}", error=True)
        return 1
    finally:
        store.db.dispose()
    if args.possible_misses:
        examples = possible_miss_examples(report, facts.systems)
        text = orjson.dumps(examples, option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        text = render(report)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            _say(f"cds-service: cannot write {args.output}: {exc.strerror or exc}", error=True)
            return 1
    else:
        sys.stdout.write(text)
    return 0


def _read_token(args: argparse.Namespace, settings: Settings) -> str | None:
    """--token-file (its first line) or CDS_AUDIT_EXPORT_TOKEN: never a command-line argument, which any local
    user can read in the process list."""
    if args.token_file is None:
        return settings.audit_export_token
    text = Path(args.token_file).read_text(encoding="utf-8").strip()
    return text.splitlines()[0].strip() if text else None


def cmd_audit_export(args: argparse.Namespace) -> int:
    """The audit log as FHIR AuditEvents: NDJSON on standard output, or PUT in batch Bundles to --to."""
    from .audit_export import ExportError, events, ndjson, post_batches

    settings = config_module.load({"AUDIT": False})
    parts = urlsplit(args.to or "")
    token = None
    if args.to:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            _say(f"cds-service: --to: expected the FHIR server's base URL (https://...), got {args.to!r}", error=True)
            return 2
        if parts.scheme == "http" and not args.allow_http:
            _say(
                "cds-service: --to uses plain http: the bearer token would travel unencrypted (--allow-http)",
                error=True,
            )
            return 2
        try:
            token = _read_token(args, settings)
        except OSError as exc:
            _say(f"cds-service: cannot read --token-file: {exc.strerror or exc}", error=True)
            return 2
    store = _store()
    try:
        store.ensure_schema()
        found = events(store.db, settings.public_url, args.since, args.until)
        if not args.to:
            out = sys.stdout.buffer
            for line in ndjson(found):
                out.write(line)
            out.flush()
            return 0
        where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"  # never userinfo
        try:
            sent = post_batches(found, args.to, token, batch_size=args.batch_size)
        except ExportError as exc:
            _say(f"cds-service: export to {where} stopped: {exc}", error=True)
            return 1
    except (StoreUnavailable, SchemaTooNew) as exc:
        _say(f"cds-service: {exc}", error=True)
        return 1
    finally:
        store.db.dispose()
    _say(
        f"{sent.events} AuditEvents sent to {where} in {sent.bundles} batch Bundles: {sent.created} created, "
        f"{sent.updated} replaced"
    )
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 10000, got {text!r}")
    return value


def _age(text: str) -> Any:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    db = sub.add_parser("db", help="database schema (CDS_DATABASE_URL; default a SQLite file in the instance folder)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="create or upgrade the schema to this release (serve does it too)")
    up.set_defaults(func=cmd_db_upgrade)

    audit = sub.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    prune = audit_sub.add_parser("purge", help="delete audit records and feedback older than an age")
    prune.add_argument(
        "--older-than",
        type=_age,
        default=parse_age("400d"),
        metavar="AGE",
        help="age such as 400d, 52w or 36h (default 400d: keeps more than a year)",
    )
    prune.set_defaults(func=cmd_audit_purge)
    replay = audit_sub.add_parser(
        "replay-spill",
        help="write audit records spilled while the database was down, and the audit journals of processes that "
        "ended (serve does it on start)",
    )
    replay.add_argument("--dir", type=Path, help="spill folder (default: CDS_AUDIT_SPILL_DIR or the instance folder's)")
    replay.set_defaults(func=cmd_audit_replay_spill)

    export = audit_sub.add_parser(
        "export", help="the audit log as FHIR R4 AuditEvents (IHE BALP style): NDJSON, or to a FHIR server"
    )
    export.add_argument("--format", choices=("fhir",), default="fhir", help="fhir: AuditEvent resources (default)")
    export.add_argument("--since", type=parse_since, metavar="DATE", help="calls from this date (UTC)")
    export.add_argument("--until", type=parse_since, metavar="DATE", help="calls before this date (UTC)")
    export.add_argument(
        "--to",
        metavar="URL",
        help="FHIR server base URL: POST batch Bundles that PUT each AuditEvent by its id (a re-export replaces); "
        "without it, NDJSON on standard output",
    )
    export.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token for --to, read from FILE (default: the setting CDS_AUDIT_EXPORT_TOKEN)",
    )
    export.add_argument("--batch-size", type=_positive, default=100, metavar="N", help="AuditEvents per Bundle")
    export.add_argument("--allow-http", action="store_true", help="allow a plain http --to URL (tests, loopback)")
    export.set_defaults(func=cmd_audit_export)

    report = sub.add_parser("report", help="calls, flagged orders, cards, accepts and overrides (monthly report)")
    report.add_argument("--since", type=parse_since, metavar="DATE", help="from this date (UTC); default: everything")
    report.add_argument("--until", type=parse_since, metavar="DATE", help="up to this date (UTC); default: now")
    report.add_argument(
        "--format",
        choices=("text", "json", "csv", "html"),
        default="text",
        help="html: one self-contained page with charts (needs the extra: pip install 'cds-service[report]')",
    )
    report.add_argument("--output", metavar="FILE", help="write the report to FILE instead of standard output")
    report.add_argument(
        "--false-alarm-reason",
        action="append",
        metavar="CODE",
        help="override reason code that marks a possible false alarm (repeatable; default: not-dsv)",
    )
    report.add_argument(
        "--possible-misses",
        action="store_true",
        help="with --format json: write the possible misses as labelled examples with an empty label, for an analyst "
        "to label and add to the policy's examples",
    )
    report.set_defaults(func=cmd_report)
