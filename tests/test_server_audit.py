"""The audit log under the real server (gunicorn, several workers, forked after the app is built): every call
audited exactly once, and a graceful stop (SIGTERM) in the middle of a load loses no answered record."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from cds_service.store.models import audit_call

from .conftest import SIGN
from .process_support import running_server as serve
from .store_support import flagged_call, table_rows

pytestmark = pytest.mark.slow


@contextmanager
def running_server(db_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    with serve(tmp_path, "--workers", "2", env={"CDS_DATABASE_URL": db_url}, ready_path="/ready") as running:
        yield running


def call(base: str) -> str | None:
    """One hook call; its hookInstance when it was answered 200 with a card, None when the server refused it."""
    body = flagged_call()
    request = urllib.request.Request(
        f"{base}/cds-services/{SIGN}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    assert len(answer["cards"]) == 1
    return str(body["hookInstance"])


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()


def audited(db_url: str) -> Counter[str]:
    return Counter(row.hook_instance for row in table_rows(db_url, audit_call))


def test_a_burst_of_concurrent_calls_is_audited_exactly_once(db_url: str, tmp_path: Path) -> None:
    with running_server(db_url, tmp_path) as (process, base, log):
        with ThreadPoolExecutor(max_workers=16) as pool:
            answered = list(pool.map(lambda _: call(base), range(300)))
        assert None not in answered
        stop(process, log)
    text = log.read_text()
    workers = {line.split("pid: ")[1].strip() for line in text.splitlines() if "Booting worker with pid" in line}
    assert len(workers) == 2
    counts = audited(db_url)
    assert set(counts) == set(answered) and len(answered) == 300
    assert set(counts.values()) == {1}
    assert "could not be written" not in text


def test_sigterm_during_load_loses_no_answered_record(db_url: str, tmp_path: Path) -> None:
    answered: list[str] = []
    refused = 0
    lock = threading.Lock()
    stopping = threading.Event()

    with running_server(db_url, tmp_path) as (process, base, log):

        def load() -> None:
            nonlocal refused
            misses = 0
            for _ in range(2000):  # bounded: stops by itself
                hook_instance = call(base)
                with lock:
                    if hook_instance is not None:
                        answered.append(hook_instance)
                    else:
                        refused += 1
                misses = misses + 1 if hook_instance is None else 0
                if stopping.is_set() and (misses >= 3 or process.poll() is not None):
                    return

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answered) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        at_sigterm = len(answered)
        stopping.set()
        stop(process, log)
        for thread in threads:
            thread.join(timeout=60)
    assert at_sigterm >= 150
    counts = audited(db_url)
    missing = set(answered) - set(counts)
    assert not missing, f"{len(missing)} answered calls missing from the audit log of {len(answered)}"
    assert set(counts.values()) == {1}
    # Calls the server never answered may or may not have been recorded; nothing else is in the log.
    assert len(counts) - len(answered) <= 16
    assert "could not be written" not in log.read_text()
