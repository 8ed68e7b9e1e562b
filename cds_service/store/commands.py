"""The storage subcommands of `cds-service`: db upgrade, audit purge, report."""

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

    return Flask("cds_service.app", instance_relative_config=True).instance_path


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
        report = build_report(store.db, since=args.since, until=args.until, false_alarm_codes=codes)
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
