"""Nothing lost at shutdown: audit records the database did not take are spilled to a local file (one JSON record a
line, fsynced, one file per process) and written back exactly once, on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask

from cds_service import cli, create_app
from cds_service.audit import CallRecord
from cds_service.config import Settings
from cds_service.engine.outcome import ActionRecord, CardRecord, VerdictRecord
from cds_service.runtime import services_of
from cds_service.store import Store, open_store
from cds_service.store import spill as spill_module
from cds_service.store.models import audit_call, audit_card
from cds_service.store.spill import decode, encode, spill

from .conftest import SIGN
from .store_support import (
    action_record,
    card_record,
    down_then_up,
    flagged_call,
    table_rows,
    temp_database,
    verdict_record,
    wait_for,
)

# A spill (and journal) line exactly as the build before the typed record wrote it (its spill.encode of a record
# holding the engine's JSON summaries); \u escapes keep the file ASCII, json.loads reads them.
PREVIOUS_LINE = json.dumps(
    json.loads(
        '{"format":"cds-audit-spill/1","callId":"call-1","record":{"service_id":"dsv-order-sign","started_at"'
        ':"2026-12-05T09:08:07.654321+02:00","hook":"order-sign","hook_instance":"h-1","iss":"https://ehr.exa'
        'mple.org","tenant":"t","jti":"j","user_id":"Practitioner/p1","patient_id":"Patient/p1","orders":[{"v'
        '":2,"order":"ServiceRequest/sr1","orderName":"Cine MRI lumbar spine \\u00e9 \\ud83d\\ude00","policy":"d'
        'sv-investigational","policyVersion":"2026.11.0","verdict":"flagged","rule":"technique-on-spine","rea'
        'son":"names the technique on the spine","deciding":[{"kind":"technique","label":"DSV","place":"code"'
        '}],"evidenceFor":[{"kind":"anatomy","label":"lumbar spine","place":"text","group":"g1","assertion":"'
        'requested"}],"evidenceAgainst":[],"region":"lumbar","review":true}],"cards":[{"uuid":"card-uuid-1","'
        'kind":"guideline","indicator":"warning","topic":"guideline","policy":"dsv-investigational","rule":"t'
        'echnique-on-spine","orders":["ServiceRequest/sr1"],"orderName":"Cine MRI lumbar spine","suggestions"'
        ':[{"uuid":"s-1","label":"Remove the order","kind":"remove","actions":["delete"]},{"uuid":"s-2","labe'
        'l":"Replace","kind":"replace","actions":["delete","create"]}]},{"uuid":"card-uuid-2","kind":"instruc'
        'tions","indicator":"info","topic":"t","policy":"dsv-investigational","rule":"r","orders":[],"orderNa'
        'me":"","suggestions":[]}],"system_actions":[{"type":"update","resource":"ServiceRequest/sr1"}],"cove'
        'rage_assertions":["ca-1"],"notes":["n"],"status":200,"error":null,"duration_ms":12.345678901234567}}'
    ),
    ensure_ascii=False,
    separators=(",", ":"),
).encode()


def spill_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-spill-*.jsonl"))


def store_on(url: str, folder: Path) -> Store:
    return open_store(
        Settings.load({"DATABASE_URL": url, "AUDIT": True, "AUDIT_SPILL_DIR": str(folder)}), "/nonexistent"
    )


def hook_instances(url: str) -> list[str]:
    return sorted(row.hook_instance for row in table_rows(url, audit_call))


def test_records_the_database_never_took_are_spilled_at_close_and_written_once_on_replay(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    folder = tmp_path / "spill"
    with temp_database(backend, tmp_path) as real_url, down_then_up(backend, tmp_path, real_url) as (url, bring_up):
        # async durability: records wait in memory, and the spill file is what keeps them at close.
        settings = {"AUTH": "off", "DATABASE_URL": url, "AUDIT_SPILL_DIR": str(folder), "AUDIT_DURABILITY": "async"}
        app = create_app(settings)
        client = app.test_client()
        sent = []
        for _ in range(3):
            body = flagged_call()
            sent.append(body["hookInstance"])
            assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
        writer = services_of(app).store.writer
        wait_for(lambda: writer.stats()["failedWrites"] >= 1, what="a failed audit write")
        writer.close(timeout=0.5)
        [path] = spill_files(folder)
        assert "3 answered calls could not be written before exit" in caplog.text and str(path) in caplog.text
        assert writer.stats()["pending"] == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # patient data: the service's user only
        lines = path.read_bytes().splitlines()
        assert sorted(decode(line)[1].hook_instance or "" for line in lines) == sorted(sent)
        kept = tmp_path / "copy.jsonl"
        shutil.copy(path, kept)

        bring_up()
        later = store_on(url, folder)
        result = later.replay_spill()
        assert (result.files, result.records, result.inserted) == (1, 3, 3)
        assert spill_files(folder) == []
        assert hook_instances(url) == sorted(sent)
        # The same file again (a crash between the commit and the removal): nothing is stored twice.
        shutil.copy(kept, folder / path.name)
        again = later.replay_spill()
        assert (again.records, again.inserted) == (3, 0)
        assert hook_instances(url) == sorted(sent)
        assert len(table_rows(url, audit_card)) == 3
        later.close()


def tricky_record() -> CallRecord:
    return CallRecord(
        service_id=SIGN,
        started_at=datetime(2026, 12, 5, 9, 8, 7, 654321, tzinfo=timezone(timedelta(hours=2))),
        hook="order-sign",
        hook_instance="b2c3d4e5-0000-4000-8000-000000000001",
        iss="https://ehr.example.org",
        tenant="clinic-ü",
        jti="jti-\u00e9-1",
        user_id="Practitioner/p\x00-1",  # a NUL: PostgreSQL refuses it, so it is cleaned on the way in
        patient_id="Patient/\U0001f600",
        orders=[verdict_record(json.loads(PREVIOUS_LINE)["record"]["orders"][0])],
        cards=[card_record(json.loads(PREVIOUS_LINE)["record"]["cards"][0])],
        system_actions=[action_record({"type": "update", "resource": "ServiceRequest/sr1"})],
        coverage_assertions=["ca-1"],
        notes=["Coverage unknown: reading it from the FHIR server failed (no complete answer within 3 s)"],
        status=200,
        error=None,
        duration_ms=12.345678901234567,
    )


def test_a_spilled_record_is_stored_exactly_as_one_written_directly(backend: str, tmp_path: Path) -> None:
    record = tricky_record()
    assert decode(encode("call-1", record)) == ("call-1", record)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with temp_database(backend, tmp_path / "a") as direct_url, temp_database(backend, tmp_path / "b") as spilled_url:
        direct = store_on(direct_url, tmp_path / "unused")
        direct.writer.record(record)
        assert direct.writer.flush(10)
        [direct_row] = table_rows(direct_url, audit_call)
        direct.close()

        folder = tmp_path / "spill"
        spill(folder, [(direct_row.call_id, record)])
        replayed = store_on(spilled_url, folder)
        assert replayed.replay_spill().inserted == 1
        replayed.close()
        [spilled_row] = table_rows(spilled_url, audit_call)
        assert spilled_row._asdict() | {"id": 0} == direct_row._asdict() | {"id": 0}
        assert spilled_row.started_at == record.started_at and orjson.dumps(spilled_row.orders) == orjson.dumps(
            record.json_parts()["orders"]
        )
        assert table_rows(spilled_url, audit_card) == table_rows(direct_url, audit_card)


def test_a_line_the_previous_build_wrote_replays_into_typed_parts_and_is_stored_as_it_was(
    backend: str, tmp_path: Path
) -> None:
    call_id, record = decode(PREVIOUS_LINE + b"\n")
    assert [type(o) for o in record.orders] == [VerdictRecord]
    assert [type(c) for c in record.cards] == [CardRecord, CardRecord]
    assert [type(a) for a in record.system_actions] == [ActionRecord]
    assert record.orders[0].flagged and record.orders[0].review and record.orders[0].region == "lumbar"
    assert record.cards[0].order == "ServiceRequest/sr1" and record.cards[1].order is None
    assert record.cards[0].suggestions[1].actions == ("delete", "create")
    # Written again (journal, spill), the line is byte for byte the one the previous build wrote.
    assert encode(call_id, record) == PREVIOUS_LINE + b"\n"
    folder = tmp_path / "spill"
    folder.mkdir()
    (folder / "audit-spill-previous-1-1.jsonl").write_bytes(PREVIOUS_LINE + b"\n")
    with temp_database(backend, tmp_path) as url:
        store = store_on(url, folder)
        assert store.replay_spill().inserted == 1
        store.close()
        [row] = table_rows(url, audit_call)
        stored = json.loads(PREVIOUS_LINE)["record"]
        assert (row.orders, row.cards, row.system_actions) == (
            stored["orders"],
            stored["cards"],
            stored["system_actions"],
        )
        assert sorted(r.card_uuid for r in table_rows(url, audit_card)) == ["card-uuid-1", "card-uuid-2"]


def test_lines_that_are_not_whole_records_are_kept_aside(tmp_path: Path, db_url: str) -> None:
    folder = tmp_path / "spill"
    good = CallRecord(service_id=SIGN, hook_instance="good")
    path, _ = spill(folder, [("call-good", good)])
    assert path is not None
    cut = encode("call-cut", CallRecord(service_id=SIGN, hook_instance="cut"))
    with path.open("ab") as out:
        out.write(b'{"format": "something-else"}\n' + cut[: len(cut) // 2])  # a foreign line, a write cut short
    store = store_on(db_url, folder)
    result = store.replay_spill()
    store.close()
    assert (result.records, result.inserted, result.rejected_lines) == (1, 1, 2)
    assert hook_instances(db_url) == ["good"]
    assert spill_files(folder) == []
    rejected = path.with_name(path.name + ".rejected").read_bytes().splitlines()
    assert rejected == [b'{"format": "something-else"}', cut[: len(cut) // 2]]


def test_a_file_another_process_is_still_writing_is_left_alone(tmp_path: Path, db_url: str) -> None:
    folder = tmp_path / "spill"
    path, _ = spill(folder, [("call-1", CallRecord(service_id=SIGN, hook_instance="busy"))])
    assert path is not None
    store = store_on(db_url, folder)
    with path.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert store.replay_spill().skipped_files == 1
    assert store.replay_spill().inserted == 1
    store.close()
    assert hook_instances(db_url) == ["busy"]


def test_health_says_spill_files_are_waiting(tmp_path: Path, store_app: Flask) -> None:
    folder = services_of(store_app).store.spill_dir
    assert folder is not None
    spill(folder, [("call-1", CallRecord(service_id=SIGN))])
    body = store_app.test_client().get("/health").get_json()
    assert body["store"]["spillFiles"] == 1


def test_the_replay_command(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    folder = tmp_path / "elsewhere"
    spill(folder, [(f"call-{i}", CallRecord(service_id=SIGN, hook_instance=str(i))) for i in range(4)])
    monkeypatch.setenv("CDS_DATABASE_URL", db_url)
    assert cli.main(["audit", "replay-spill", "--dir", str(folder)]) == 0
    assert "1 spill files written" in capsys.readouterr().out
    assert hook_instances(db_url) == ["0", "1", "2", "3"]
    assert spill_module.pending_files(folder) == []
