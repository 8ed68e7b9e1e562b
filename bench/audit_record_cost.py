"""Cost of the audit write on the hook path: record() itself, and whole hook calls with the audit on and off.

Usage: python bench/audit_record_cost.py [DATABASE_URL]   (default: a SQLite file in a temporary folder)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cds_service import create_app
from cds_service.audit import CallRecord
from cds_service.engine.outcome import CardRecord, SuggestionRecord, VerdictRecord
from cds_service.runtime import services_of
from tests.store_support import flagged_call


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered)) - 1))]


def summary(name: str, micros: list[float]) -> None:
    print(
        f"{name:<44} n={len(micros):>6}  p50 {pct(micros, 0.50):8.1f} us  p99 {pct(micros, 0.99):8.1f} us  "
        f"p99.9 {pct(micros, 0.999):8.1f} us  max {max(micros):9.1f} us  mean {statistics.fmean(micros):7.1f} us"
    )


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    app = create_app({"AUTH": "off", "DATABASE_URL": url})
    client = app.test_client()
    store = services_of(app).store
    store.upgrade()

    # A real record, as api.call_service builds it, to copy.
    store.writer.batch_window = 0.2
    response = client.post("/cds-services/dsv-order-sign", json=flagged_call())
    if response.status_code != 200:
        raise SystemExit(f"hook call failed: {response.status_code}")
    store.writer.flush(10)

    # 1. record() alone, 20 000 times in bursts of 200 (the writer thread writes meanwhile, as in production).
    template = dict(
        service_id="dsv-order-sign",
        hook="order-sign",
        hook_instance="00000000-0000-4000-8000-000000000000",
        user_id="Practitioner/prac-1",
        patient_id="pat-1",
        orders=[VerdictRecord("ServiceRequest/sr1", "", "dsv", "1", True, "rule", "reason")],
        cards=[
            CardRecord(
                "x", "guideline", "warning", "", "", "", None, "", (SuggestionRecord("s", "l", "remove", ("delete",)),)
            )
        ],
        duration_ms=3.0,
    )
    timings: list[float] = []
    for _burst in range(100):
        for _ in range(200):
            record = CallRecord(**template)  # type: ignore[arg-type]
            start = time.perf_counter_ns()
            store.writer.record(record)
            timings.append((time.perf_counter_ns() - start) / 1000)
        time.sleep(0.01)
    if not store.writer.flush(60):
        raise SystemExit("the writer did not catch up in 60 s")
    summary(f"record() ({store.writer.durability}: journal append + fsync, queue put)", timings)
    print(f"  writer stats: {store.writer.stats()}")

    # 2. Whole hook calls through the app: audit with sync durability (journal, group fsync), async, and off, in
    # alternating blocks of 500 so that the machine's noise falls on all alike; after a block the writer is flushed
    # (untimed) so it is idle during the next. The differences are what the audit costs the hook, sharing the GIL
    # with the writer thread and waiting for the journal's fsync included.
    folder = Path(tempfile.mkdtemp())
    variants: dict[str, dict[str, object]] = {
        "audit on, sync": {"AUDIT_DURABILITY": "sync"},
        "audit on, async": {"AUDIT_DURABILITY": "async"},
        "audit off": {"AUDIT": False},
    }
    apps = {
        label: create_app({"AUTH": "off", "DATABASE_URL": url, "AUDIT_SPILL_DIR": str(folder / str(n)), **extra})
        for n, (label, extra) in enumerate(variants.items())
    }
    clients = {label: bench_app.test_client() for label, bench_app in apps.items()}
    calls: dict[str, list[float]] = {label: [] for label in apps}
    for block in range(9):
        for label in apps:
            for _ in range(500):
                body = flagged_call()
                start = time.perf_counter_ns()
                clients[label].post("/cds-services/dsv-order-sign", json=body)
                if block:  # the first block warms up
                    calls[label].append((time.perf_counter_ns() - start) / 1000)
            services_of(apps[label]).store.writer.flush(30)
    for label in apps:
        services_of(apps[label]).store.close()
        summary(f"hook call via test client, {label}", calls[label])
    store.close()


if __name__ == "__main__":
    main()
