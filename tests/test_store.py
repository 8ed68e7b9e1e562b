"""The database: migrations (and refusing a newer schema), URLs, the shared jti store, retention purge."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.cli import main
from cds_service.config import ConfigError
from cds_service.runtime import services_of
from cds_service.store import SchemaTooNew
from cds_service.store.db import database_url
from cds_service.store.maintenance import parse_age
from cds_service.store.schema import VERSION_TABLE, head_revision

from .jwt_support import EHR, PUBLIC_URL, SIGN_URL, bearer, claims, ec_key, issuers_file, jwks, token
from .store_support import card_record, flagged_call, rows, store_for, unreachable_url

ROOT = Path(__file__).resolve().parent.parent


def test_upgrade_creates_the_schema_once(db_url: str) -> None:
    store = store_for(db_url)
    assert store.upgrade() == (None, head_revision())
    assert store.upgrade() == (head_revision(), head_revision())
    tables = set(inspect(store.db.engine).get_table_names())
    assert {"audit_call", "audit_card", "feedback", "jti_seen", VERSION_TABLE} <= tables
    store.close()


def test_db_upgrade_command(db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    assert main(["db", "upgrade"]) == 0
    assert f"schema upgraded from empty to {head_revision()}" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert f"schema already at {head_revision()}" in capsys.readouterr().out


def test_a_newer_schema_stops_start_up(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_for(db_url)
    store.upgrade()
    with store.db.engine.begin() as conn:
        conn.execute(text("UPDATE cds_alembic_version SET version_num = '9999_future'"))
    store.close()

    app = create_app({"AUTH": "off", "DATABASE_URL": db_url})
    with pytest.raises(SchemaTooNew, match=r"'9999_future'.*newer release"):
        services_of(app).store.prepare_serve()
    # The real command: exits before starting gunicorn, saying why.
    env = {"CDS_AUTH": "off", "CDS_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "cds_service", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "9999_future" in done.stderr and "newer release" in done.stderr
    # Nothing is written to a database migrated by a newer release.
    fresh = store_for(db_url)
    with pytest.raises(SchemaTooNew):
        fresh.ensure_schema()
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    assert main(["db", "upgrade"]) == 1
    fresh.close()


def test_serve_stops_when_the_database_is_unreachable(backend: str, tmp_path: Path) -> None:
    app = create_app({"AUTH": "off", "DATABASE_URL": unreachable_url(backend, tmp_path)})
    with pytest.raises(RuntimeError, match="cannot reach the database"):
        services_of(app).store.prepare_serve()


def test_database_urls(tmp_path: Path) -> None:
    default = database_url(None, tmp_path / "instance")
    assert default.drivername == "sqlite"
    assert default.database == str(tmp_path / "instance" / "cds.sqlite3")
    assert (tmp_path / "instance").is_dir()
    assert database_url("postgresql://u@db:5432/cds", tmp_path).drivername == "postgresql+psycopg"
    assert database_url("postgresql+psycopg://u@db/cds", tmp_path).drivername == "postgresql+psycopg"
    with pytest.raises(ConfigError, match="only sqlite"):
        create_app({"AUTH": "off", "DATABASE_URL": "mysql://u:secret@db/cds"})
    with pytest.raises(ConfigError, match="not a database URL"):
        create_app({"AUTH": "off", "DATABASE_URL": "not a url"})


def test_create_app_defaults_to_sqlite_in_the_instance_folder() -> None:
    # Only builds the URL (the instance folder is created; nothing connects until first use).
    app = create_app({"AUTH": "off"})
    store = services_of(app).store
    assert store.db.url.database == str(Path(app.instance_path) / "cds.sqlite3")


def test_jti_store_refuses_replays_across_workers(db_url: str) -> None:
    # Two stores on one database stand for two workers (or two instances).
    first, second = store_for(db_url), store_for(db_url)
    expires = time.time() + 300
    assert first.jti_store.remember("https://ehr.example", "jti-1", expires) is True
    assert second.jti_store.remember("https://ehr.example", "jti-1", expires) is False
    assert first.jti_store.remember("https://ehr.example", "jti-1", expires) is False
    assert second.jti_store.remember("https://other.example", "jti-1", expires) is True
    # A jti whose token has expired may be used by a new token (its row is stale, not a replay).
    assert first.jti_store.remember("https://ehr.example", "old", time.time() - 1) is True
    assert second.jti_store.remember("https://ehr.example", "old", expires) is True
    assert second.jti_store.remember("https://ehr.example", "old", expires) is False
    first.close()
    second.close()


def test_jti_store_one_winner_under_concurrency(db_url: str) -> None:
    stores = [store_for(db_url) for _ in range(4)]
    stores[0].upgrade()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def attempt(index: int) -> None:
        barrier.wait()
        results.append(stores[index % 4].jti_store.remember("iss", "same-jti", time.time() + 60))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    for store in stores:
        store.close()


def test_jti_store_cleans_up_expired_rows(db_url: str) -> None:
    store = store_for(db_url)
    store.jti_store._cleanup_every = 0.0
    store.jti_store.remember("iss", "expired", time.time() - 10)
    store.jti_store.remember("iss", "live", time.time() + 60)
    assert [r[0] for r in rows(db_url, "SELECT jti FROM jti_seen")] == ["live"]
    store.close()


def test_jti_store_falls_back_to_this_process_when_the_database_is_down(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_for(unreachable_url(backend, tmp_path))
    assert store.jti_store.remember("iss", "j", time.time() + 60) is True
    assert store.jti_store.remember("iss", "j", time.time() + 60) is False
    assert store.jti_store.failures == 2
    assert "jti store unreachable" in caplog.text
    assert store.health()["store"]["jtiFailures"] == 2


def test_audit_purge(db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    store = store_for(db_url)
    now = datetime.now(UTC)
    for age_days, name in ((500, "old"), (401, "older-than-400"), (399, "recent"), (0, "today")):
        card = {"uuid": f"card-{name}", "suggestions": []}
        store.writer.record(
            CallRecord(
                service_id="dsv-order-sign",
                hook_instance=name,
                started_at=now - timedelta(days=age_days),
                cards=[card_record(card)],
            )
        )
    assert store.writer.flush(10)
    store.close()
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    assert main(["audit", "purge", "--older-than", "400d"]) == 0
    out = capsys.readouterr().out
    assert "2 calls, 2 cards" in out
    kept = sorted(r[0] for r in rows(db_url, "SELECT hook_instance FROM audit_call"))
    assert kept == ["recent", "today"]
    assert sorted(r[0] for r in rows(db_url, "SELECT card_uuid FROM audit_card")) == ["card-recent", "card-today"]
    # The default keeps more than a year.
    assert main(["audit", "purge"]) == 0
    assert "0 calls" in capsys.readouterr().out


@pytest.mark.parametrize("age", ["400", "0d", "12h", "-3d", "4m"])
def test_purge_refuses_bad_ages(age: str) -> None:
    with pytest.raises(ValueError):
        parse_age(age)
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "purge", "--older-than", age])
    assert exit_info.value.code == 2


def test_parse_age() -> None:
    assert parse_age("400d") == timedelta(days=400)
    assert parse_age("52w") == timedelta(weeks=52)
    assert parse_age("36h") == timedelta(hours=36)


def test_commands_report_an_unreachable_database(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CDS_DATABASE_URL", unreachable_url(backend, tmp_path))
    assert main(["db", "upgrade"]) == 1
    assert main(["report"]) == 1
    assert main(["audit", "purge"]) == 1
    assert capsys.readouterr().err.count("cds-service:") == 3


def test_a_token_replayed_to_another_instance_is_refused(db_url: str, tmp_path: Path) -> None:
    # Two apps on one database stand for two gunicorn workers or two instances behind a load balancer.
    key = ec_key()
    issuers = issuers_file(tmp_path / "issuers.json", [{"iss": EHR, "jwks": jwks(key)}])
    config = {"AUTH": "jwt", "TRUSTED_ISSUERS": str(issuers), "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": db_url}
    first, second = create_app(config), create_app(config)
    body = flagged_call()
    stolen = bearer(token(key, claims(SIGN_URL)))
    assert first.test_client().post("/cds-services/dsv-order-sign", json=body, headers=stolen).status_code == 200
    assert second.test_client().post("/cds-services/dsv-order-sign", json=body, headers=stolen).status_code == 401
    fresh = bearer(token(key, claims(SIGN_URL)))
    assert second.test_client().post("/cds-services/dsv-order-sign", json=body, headers=fresh).status_code == 200
    for app in (first, second):
        services_of(app).store.close()
