"""What making an audit record durable costs the call that waits for it, by mechanism (issue 20's choice).

Each of THREADS threads makes records one after another and waits until each is durable, as hook threads would:
  journal  - cds_service.store.journal.Journal.append: a line in this process's file, fdatasync shared by the
             threads waiting at the same time (group commit)
  pg       - one INSERT and COMMIT per record on PostgreSQL (synchronous_commit on: the commit waits for the WAL
             flush, which PostgreSQL groups across sessions itself)
  write    - the journal's line written without the fdatasync (survives the process's death, not a power cut)
  sqlite   - one INSERT and COMMIT per record on SQLite in WAL mode with synchronous=FULL (NORMAL, the service's
             setting, does not sync at commit, so it is not durable)

Usage: python bench/durability_cost.py [--threads 1,8] [--records 400] [--pg URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, event, text

from cds_service.audit import CallRecord
from cds_service.engine.outcome import CardRecord, VerdictRecord
from cds_service.store.audit_writer import write_batch
from cds_service.store.journal import Journal
from cds_service.store.models import metadata
from cds_service.store.spill import encode


def record() -> CallRecord:
    # The size of a real one-card call's record (about 1.5 KB as a journal line).
    return CallRecord(
        service_id="dsv-order-sign",
        hook="order-sign",
        hook_instance=str(uuid.uuid4()),
        user_id="Practitioner/prac-1",
        patient_id="Patient/pat-1",
        orders=[VerdictRecord(f"ServiceRequest/sr{i}", "", "dsv", "1", i == 0, "rule", "reason") for i in range(5)],
        cards=[
            CardRecord(
                str(uuid.uuid4()),
                "guideline",
                "warning",
                "Dynamic spinal visualization is investigational",
                "dsv",
                "rule",
                "ServiceRequest/sr0",
                "",
                (),
            )
        ],
        notes=["Coverage read from prefetch"],
        duration_ms=3.0,
    )


def run(
    make: Callable[[], Callable[[str, CallRecord], object]], threads: int, records: int
) -> tuple[list[float], float]:
    """(per-record latencies in ms, records per second) with `threads` threads making `records` records each."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        durable = make()
        mine = []
        barrier.wait()
        for _ in range(records):
            call = record()
            started = time.perf_counter()
            durable(str(uuid.uuid4()), call)
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    return latencies, threads * records / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--records", type=int, default=400, help="records per thread")
    parser.add_argument("--pg", default=None, help="a PostgreSQL URL (a scratch schema is made and dropped)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="durability-"))

    def journal_maker() -> Callable[[], Callable[[str, CallRecord], object]]:
        journal = Journal(folder / "journal", segment_records=100_000)
        return lambda: journal.append

    def database_maker(url: str, backend: str) -> Callable[[], Callable[[str, CallRecord], object]]:
        engine = create_engine(url, pool_size=20)
        if backend == "sqlite":

            @event.listens_for(engine, "connect")
            def pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

        metadata.create_all(engine)

        def make() -> Callable[[str, CallRecord], object]:
            def durable(call_id: str, call: CallRecord) -> None:
                with engine.begin() as conn:
                    write_batch(conn, backend, [(call_id, call)])

            return durable

        return make

    def write_only_maker() -> Callable[[], Callable[[str, CallRecord], object]]:
        # For comparison: the journal's line written (in the kernel's page cache: it survives the process, not a
        # power cut) without waiting for the disk.
        fd = os.open(folder / "write-only.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return lambda: lambda call_id, call: os.write(fd, encode(call_id, call))

    mechanisms = {
        "journal": journal_maker(),
        "write": write_only_maker(),
        "sqlite": database_maker(f"sqlite:///{folder / 'a.sqlite3'}", "sqlite"),
    }
    schema = f"durability_{uuid.uuid4().hex[:12]}"
    if args.pg:
        admin = create_engine(args.pg)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in args.pg else "?"
        mechanisms["pg"] = database_maker(f"{args.pg}{sep}options=-csearch_path%3D{schema}", "postgresql")
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            for name, make in mechanisms.items():
                latencies, rate = run(make, threads, args.records)
                print(
                    f"{name:8s} threads={threads:<2d} {rate:8.0f} records/s  p50 {pct(latencies, 0.5):6.2f} ms  "
                    f"p99 {pct(latencies, 0.99):6.2f} ms  mean {statistics.fmean(latencies):6.2f} ms",
                    flush=True,
                )
    finally:
        if args.pg:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


if __name__ == "__main__":
    main()
