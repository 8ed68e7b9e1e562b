"""The storage subcommands of `cds-service`: db upgrade, audit purge, audit replay-spill, report."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import config as config_module
from . import Store, open_store
from .db import SchemaTooNew, StoreUnavailable, safe_url
from .maintenance import parse_age, purge
from .report import FALSE_ALARM_CODES, build_report, render_csv, render_json, render_text


def _say(text: str, *, error: bool = False) -> None:
    (sys.stderr if error else sys.stdout).write(text + "\n")


def instance_path() -> str:
    """The same instance folder the app uses (Flask derives it from the package's location)."""
    from flask import Flask

    return Flask(config_module.FLASK_IMPORT_NAME, instance_relative_config=True).instance_path


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


def reason_displays(settings: dict[str, Any]) -> dict[tuple[str, str], str]:
    """Override reasons' displays by (system, code), from the policies the service uses; none if they do not load."""
    from ..engine import PolicyError, load_policies

    try:
        policies = load_policies(settings["POLICY_DIR"])
    except (PolicyError, OSError) as exc:
        _say(f"cds-service: override reasons are shown by code only; the policies did not load: {exc}", error=True)
        return {}
    return {(r.system, r.code): r.display for p in policies.policies for r in p.card.override_reasons}


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
        report = build_report(
            store.db,
            since=args.since,
            until=args.until,
            reason_displays=reason_displays(config_module.load({"AUDIT": False})),
            false_alarm_codes=codes,
        )
    except (StoreUnavailable, SchemaTooNew) as exc:
        _say(f"cds-service: {exc}", error=True)
        return 1
    finally:
        store.db.dispose()
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
    report.set_defaults(func=cmd_report)
