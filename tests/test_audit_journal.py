"""The audit journal (CDS_AUDIT_DURABILITY=sync): a record is on disk before its call answers, calls share fsyncs,
segments go once the database holds their records, and a torn or replayed journal stores each record once."""

from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import pytest

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.config import Settings
from cds_service.runtime import services_of
from cds_service.store import Store, open_store
from cds_service.store.audit_writer import write_batch
from cds_service.store.journal import Journal
from cds_service.store.models import audit_call, audit_card
from cds_service.store.spill import decode, encode

from .conftest import SIGN
from .store_support import card_record, down_then_up, flagged_call, table_rows, temp_database, wait_for


def journals(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-journal-*.jsonl"))


def journal_lines(folder: Path) -> list[tuple[str, CallRecord]]:
    return [decode(line) for path in journals(folder) for line in path.read_bytes().splitlines()]


def segment_of(folder: Path, call_id: str) -> Path:
    [path] = [
        path for path in journals(folder) if call_id in {decode(line)[0] for line in path.read_bytes().splitlines()}
    ]
    return path


def hook_instances(url: str) -> list[str]:
    return sorted(row.hook_instance for row in table_rows(url, audit_call))


def store_on(url: str, folder: Path, durability: str = "sync") -> Store:
    settings = {"DATABASE_URL": url, "AUDIT": True, "AUDIT_SPILL_DIR": str(folder), "AUDIT_DURABILITY": durability}
    return open_store(Settings.load(settings), "/nonexistent")


def record(n: int) -> CallRecord:
    return CallRecord(
        service_id=SIGN, hook="order-sign", hook_instance=f"hook-{n:05d}", cards=[card_record({"uuid": f"c-{n}"})]
    )


def test_an_answered_call_is_in_the_journal_before_the_answer_even_with_the_database_down(
    backend: str, tmp_path: Path
) -> None:
    folder = tmp_path / "spill"
    with temp_database(backend, tmp_path) as real_url, down_then_up(backend, tmp_path, real_url) as (url, bring_up):
        app = create_app({"AUTH": "off", "DATABASE_URL": url, "AUDIT_SPILL_DIR": str(folder)})
        client = app.test_client()
        sent = []
        for _ in range(3):
            body = flagged_call()
            assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
            sent.append(body["hookInstance"])
            # The answer is back: its record is in the journal already (the database cannot have it).
            assert sorted(r.hook_instance or "" for _, r in journal_lines(folder)) == sorted(sent)
        [path] = journals(folder)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # patient data: the service's user only
        writer = services_of(app).store.writer
        assert writer.stats()["journal"]["journaled"] == 3 and writer.stats()["durability"] == "sync"
        bring_up()
        wait_for(lambda: writer.stats()["written"] == 3, what="the records written once the database is up")
        assert hook_instances(url) == sorted(sent)
        services_of(app).store.close()
        # Every record is in the database: the journal has nothing left to keep.
        assert journals(folder) == []
        assert hook_instances(url) == sorted(sent)


def test_async_durability_keeps_no_journal(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "spill"
    app = create_app(
        {"AUTH": "off", "DATABASE_URL": db_url, "AUDIT_SPILL_DIR": str(folder), "AUDIT_DURABILITY": "async"}
    )
    client = app.test_client()
    body = flagged_call()
    assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
    assert journals(folder) == []
    writer = services_of(app).store.writer
    assert writer.stats()["durability"] == "async" and "journal" not in writer.stats()
    assert writer.flush()
    assert hook_instances(db_url) == [body["hookInstance"]]


def test_concurrent_appends_share_fsyncs_and_every_line_is_whole(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_records=150)
    threads = [
        threading.Thread(target=lambda t=t: [journal.append(f"id-{t}-{i}", record(t * 1000 + i)) for i in range(100)])
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = journal_lines(tmp_path / "j")
    assert len(lines) == 800 and len({call_id for call_id, _ in lines}) == 800
    assert len(journals(tmp_path / "j")) == 6  # 800 records in segments of 150
    state = journal.describe()
    assert state["journaled"] == 800
    # Group commit: a thread that finds an fsync under way waits for the next one instead of making its own.
    assert isinstance(state["fsyncs"], int) and state["fsyncs"] < 800
    journal.close()


def test_a_segment_goes_once_every_record_in_it_is_settled(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    journal = Journal(folder, segment_records=2)
    for n in range(5):
        assert journal.append(f"id-{n}", record(n))
    first, second, third = (segment_of(folder, f"id-{n}") for n in (0, 2, 4))
    assert len({first, second, third}) == 3 and len(journals(folder)) == 3
    journal.settle(["id-0"])
    assert first.exists()  # id-1 is not in the database yet
    journal.settle(["id-1", "id-3"])
    assert not first.exists() and second.exists()
    journal.settle(["id-2"])
    assert not second.exists()
    assert third.exists()  # still being appended to
    journal.settle(["id-4"])
    assert journal.close() == [] and journals(folder) == []


def test_a_journal_left_by_a_killed_process_is_replayed_once_and_a_torn_last_line_is_skipped(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    folder = tmp_path / "spill"
    folder.mkdir()
    entries = [(f"00000000-0000-4000-8000-00000000000{n}", record(n)) for n in range(3)]
    torn = encode("00000000-0000-4000-8000-000000000009", record(9))
    path = folder / "audit-journal-host-4242-20261207T000000Z-abcd0123.jsonl"
    # As a SIGKILL in the middle of an append leaves it: whole lines, then part of one.
    path.write_bytes(b"".join(encode(call_id, r) for call_id, r in entries) + torn[: len(torn) // 2])
    with temp_database(backend, tmp_path) as url:
        store = store_on(url, folder)
        # One record reached the database before the kill (same call id): the replay must not store it again.
        store.ensure_schema()
        with store.db.engine.begin() as conn:
            write_batch(conn, store.db.backend, entries[:1])
        result = store.replay_spill()
        assert (result.files, result.records, result.inserted, result.rejected_lines) == (1, 3, 2, 1)
        assert "torn last line" in caplog.text and path.name in caplog.text
        assert not path.exists()
        assert store.replay_spill().files == 0  # nothing left to replay: exactly once
        assert sorted(row.call_id for row in table_rows(url, audit_call)) == [e[0] for e in entries]
        assert len(table_rows(url, audit_card)) == 3
        store.close()


def test_a_live_processs_journal_is_never_replayed_by_another(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "spill"
    live = Journal(folder)
    assert live.append("00000000-0000-4000-8000-000000000001", record(1))
    store = store_on(db_url, folder)
    store.ensure_schema()
    result = store.replay_spill()
    assert (result.files, result.skipped_files) == (0, 1)  # locked by its process
    assert hook_instances(db_url) == []
    kept = live.close()  # exits with its record not in the database: the file stays, unlocked
    assert kept == journals(folder)
    assert store.replay_spill().inserted == 1 and journals(folder) == []
    assert hook_instances(db_url) == ["hook-00001"]
    store.close()
