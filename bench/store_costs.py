"""The database work beside a hook call: the audit writer's CPU per record (batched) and the JWT replay check.

Usage: python bench/store_costs.py [DATABASE_URL ...]   (default: a SQLite file, and PostgreSQL at
CDS_TEST_DATABASE_URL when it is set). Prints, per database: the writer thread's CPU per record for batches as the
writer makes them at steady load (rows built from a real flagged call's audit record, one transaction per batch),
and the latency of DatabaseJtiStore.remember (one new jti per call, as every JWT carries).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.runtime import services_of
from cds_service.store import Store
from cds_service.store.audit_writer import write_batch
from tests.store_support import flagged_call


def real_record(url: str) -> CallRecord:
    """The audit record of a real flagged call, captured from the app."""
    app = create_app({"AUTH": "off", "DATABASE_URL": url, "AUDIT": True})
    store: Store = services_of(app).store
    captured: list[CallRecord] = []
    original = store.writer.record

    def capture(call: CallRecord) -> None:
        captured.append(call)
        original(call)

    store.writer.record = capture  # type: ignore[method-assign]
    app.test_client().post("/cds-services/dsv-order-sign", json=flagged_call())
    store.writer.flush(10)
    return captured[-1]


def writer_cpu(url: str, record: CallRecord, batch: int = 200, batches: int = 25) -> float:
    """Microseconds of CPU (this thread) per record written in batches of `batch`."""
    store = Store.__new__(Store)
    app = create_app({"AUTH": "off", "DATABASE_URL": url, "AUDIT": True})
    store = services_of(app).store
    store.ensure_schema()
    db = store.db
    spent = 0.0
    for _ in range(batches):
        entries = [(uuid.uuid4().hex, record) for _ in range(batch)]
        started = time.thread_time()
        with db.engine.begin() as conn:
            write_batch(conn, db.backend, entries)
        spent += time.thread_time() - started
    return spent / (batch * batches) * 1e6


def jti_latency(url: str, calls: int = 2000) -> tuple[float, float]:
    app = create_app({"AUTH": "off", "DATABASE_URL": url})
    store = services_of(app).store
    jtis = store.jti_store
    expires = time.time() + 300
    for _ in range(50):
        jtis.remember("https://ehr.example.org", uuid.uuid4().hex, expires)
    times = []
    for _ in range(calls):
        jti = uuid.uuid4().hex
        started = time.perf_counter()
        jtis.remember("https://ehr.example.org", jti, expires)
        times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    return statistics.median(times), times[int(0.99 * len(times)) - 1]


def main() -> None:
    urls = sys.argv[1:]
    if not urls:
        urls = [f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"]
        if os.environ.get("CDS_TEST_DATABASE_URL"):
            urls.append(os.environ["CDS_TEST_DATABASE_URL"])
    record = real_record(f"sqlite:///{tempfile.mkdtemp()}/capture.sqlite3")
    print("| database | audit writer CPU per record (batches of 200) | jti check p50 | jti check p99 |")
    print("|---|---|---|---|")
    for url in urls:
        cpu = writer_cpu(url, record)
        p50, p99 = jti_latency(url)
        name = url.split("://")[0].split("+")[0]
        print(f"| {name} | {cpu:.1f} us | {p50:.0f} us | {p99:.0f} us |")


if __name__ == "__main__":
    main()
