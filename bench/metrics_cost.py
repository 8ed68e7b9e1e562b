"""What metrics add to one hook call and what a scrape costs, in prometheus_client's multiprocess mode as `serve` runs.

Run: `python bench/metrics_cost.py` (a few seconds). One real call through the app gives a real audit record; then
the per-call metric work (observe_call, audit queued and written) is timed on it, and a scrape over the files of
two "workers" (this process and a forked child).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# As `serve` does: the multiprocess folder before prometheus_client is imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-cost-")

from cds_service import create_app  # noqa: E402
from cds_service.audit import CallRecord  # noqa: E402
from cds_service.ops import metrics  # noqa: E402
from cds_service.runtime import services_of  # noqa: E402
from tests import builders as b  # noqa: E402

CALLS = 20_000


def one_record() -> CallRecord:
    """The record of a real 5-order order-sign call (one flagged), as the audit sink receives it."""
    seen: list[CallRecord] = []
    app = create_app({"AUTH": "off", "AUDIT": False, "DATABASE_URL": "sqlite://"})
    observed = services_of(app).runtime.audit
    inner = observed.inner  # type: ignore[attr-defined]
    observed.inner = type("Keep", (), {"record": lambda self, call: seen.append(call)})()  # type: ignore[attr-defined]
    orders = [b.service_request("d1", text="Digital motion x-ray of the cervical spine")]
    orders += [b.service_request(f"x{i}", text=f"XR lumbar spine {i} views") for i in range(4)]
    response = app.test_client().post("/cds-services/dsv-order-sign", json=b.hook_request("order-sign", orders))
    if response.status_code != 200:
        raise SystemExit(f"the call answered {response.status_code}")
    observed.inner = inner  # type: ignore[attr-defined]
    return seen[0]


def per_call(record: CallRecord) -> list[float]:
    """Microseconds per call for what the service does per call with metrics on, in rounds of CALLS/10."""
    rounds = []
    for _ in range(10):
        started = time.perf_counter()
        for _ in range(CALLS // 10):
            metrics.observe_call(record)
            metrics.audit_queued()
            metrics.audit_written(1)
        rounds.append((time.perf_counter() - started) / (CALLS // 10) * 1e6)
    return rounds


def main() -> None:
    record = one_record()
    m = metrics.current()
    if m is None or not m.multiprocess:
        raise SystemExit("metrics are not in multiprocess mode")
    print(f"record: {len(record.orders)} orders, {len(record.cards)} cards, status {record.status}")
    rounds = per_call(record)
    print(f"metrics per call: median {statistics.median(rounds):.1f} us (rounds {min(rounds):.1f}-{max(rounds):.1f})")
    child = os.fork()
    if child == 0:  # a second "worker" with its own files
        per_call(record)
        os._exit(0)
    os.waitpid(child, 0)
    scrapes = []
    for _ in range(50):
        started = time.perf_counter()
        body, _ = m.exposition()
        scrapes.append((time.perf_counter() - started) * 1000)
    print(f"scrape over 2 processes' files: median {statistics.median(scrapes):.2f} ms, {len(body)} bytes")


if __name__ == "__main__":
    main()
