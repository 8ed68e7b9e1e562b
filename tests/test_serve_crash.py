"""Crash-safe audit under the real server (`cds-service serve`, forked workers, calls in flight): after `kill -9` of
one worker, or of the master and every worker, with the database up or down, every call that got a 200 is in the
audit table exactly once once the service runs again; a full disk degrades /health and /ready while calls answer."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds_service.store.models import audit_call

from .conftest import SIGN
from .process_support import running_server
from .store_support import flagged_call, outage, table_rows, temp_database, wait_for

pytestmark = pytest.mark.slow


class Load:
    """Callers in a loop, each call on a new connection; the hookInstance of every call that got a 200."""

    def __init__(self, base: str, callers: int = 8) -> None:
        self.base = base
        self.answered: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def more(self, count: int, timeout: float = 60) -> None:
        """Wait until `count` more calls got their 200."""
        target = len(self.answered) + count
        wait_for(lambda: len(self.answered) >= target, timeout, f"{count} more answered calls")

    def _run(self) -> None:
        while not self._stop.is_set():
            body = flagged_call()
            request = urllib.request.Request(
                f"{self.base}/cds-services/{SIGN}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                    if response.status == 200 and len(answer["cards"]) == 1:
                        self.answered.append(body["hookInstance"])
            # The worker that had the connection was killed: no answer, or one cut off mid-body (IncompleteRead).
            except (OSError, ValueError, http.client.HTTPException):
                self.failed += 1
                time.sleep(0.01)


def workers_of(master: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def journals(folder: Path, pid: int | None = None) -> list[Path]:
    return sorted(folder.glob(f"audit-journal-*-{pid}-*.jsonl" if pid else "audit-journal-*.jsonl"))


def stop(process: subprocess.Popen[bytes], log: Path) -> str:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()
    return log.read_text()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read()))


def assert_each_answered_call_stored_once(url: str, answered: list[str]) -> None:
    counts = Counter(row.hook_instance for row in table_rows(url, audit_call))
    missing = set(answered) - set(counts)
    assert not missing, f"{len(missing)} of {len(answered)} answered calls are not in the audit table"
    # Calls killed after their record was journaled but before their answer left may be stored too: once.
    assert set(counts.values()) == {1}, [key for key, n in counts.items() if n > 1][:5]


@pytest.mark.parametrize("database", ["up", "down"])
def test_kill_9_of_one_worker_mid_stream_loses_no_answered_call(backend: str, database: str, tmp_path: Path) -> None:
    spill_dir = tmp_path / "audit-spill"  # conftest points CDS_AUDIT_SPILL_DIR here
    with temp_database(backend, tmp_path) as real_url, outage(backend, real_url) as (url, cut, restore):
        env = {"CDS_DATABASE_URL": url}
        with running_server(tmp_path, "--workers", "2", env=env, ready_path="/ready") as (process, base, log):
            with Load(base) as load:
                load.more(40)
                if database == "down":
                    cut()
                    load.more(40)
                victim, _survivor = workers_of(process.pid)
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: len(workers_of(process.pid)) == 2 and victim not in workers_of(process.pid))
                load.more(40)  # the replacement worker and the survivor answer on
                if database == "down":
                    restore()
                # A live worker (the replacement at its start, or any worker's writer looking every few seconds)
                # replays the killed worker's journal into the database and removes it.
                wait_for(
                    lambda: not journals(spill_dir, victim), timeout=40, what="the killed worker's journal replayed"
                )
                load.more(20)
            text = stop(process, log)
        assert f"-{victim}-" in text and "written to the database" in text
        assert_each_answered_call_stored_once(real_url, load.answered)
    assert load.failed < len(load.answered)


@pytest.mark.parametrize("database", ["up", "down"])
def test_kill_9_of_master_and_workers_mid_stream_loses_no_answered_call(
    backend: str, database: str, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "audit-spill"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    with temp_database(backend, tmp_path) as real_url, outage(backend, real_url) as (url, cut, restore):
        env = {"CDS_DATABASE_URL": url}
        with (
            running_server(first, "--workers", "2", env=env, ready_path="/ready") as (process, base, _log),
            Load(base) as load,
        ):
            load.more(40)
            if database == "down":
                cut()
                load.more(40)
            everyone = [process.pid, *workers_of(process.pid)]
            for pid in everyone:  # as a power cut or an OOM kill of the container leaves it: no hook runs
                os.kill(pid, signal.SIGKILL)
            process.wait(timeout=10)
            wait_for(lambda: not any(alive(pid) for pid in everyone), what="every process gone")
        answered = list(load.answered)
        if database == "down":
            left = journals(spill_dir)
            assert left and sum(len(p.read_bytes().splitlines()) for p in left) >= 40
            restore()
        # The next start: the master replays every journal before it forks the workers.
        with running_server(second, env=env, ready_path="/ready") as (process, _base, log):
            text = stop(process, log)
        assert journals(spill_dir) == []
        if database == "down":
            assert "written to the database" in text
        assert_each_answered_call_stored_once(real_url, answered)


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` (a disk that fills up); skipped where mounting is not allowed."""
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; the file's path."""
    path = folder / "filler"
    with path.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return path


def test_a_full_disk_degrades_health_and_readiness_while_calls_answer(db_url: str, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as disk:
        env = {"CDS_DATABASE_URL": db_url, "CDS_AUDIT_SPILL_DIR": str(disk)}
        with running_server(tmp_path, "--workers", "2", env=env, ready_path="/ready") as (process, base, log):
            with Load(base, callers=2) as load:
                load.more(10)
                filler = fill(disk)
                load.more(30)
                for _ in range(4):  # either worker answers: each reports the full disk
                    status, health = get(f"{base}/health")
                    assert status == 200 and health["status"] == "degraded"
                    assert "audit journal" in health["store"]["error"]
                    status, ready = get(f"{base}/ready")
                    assert status == 503 and ready["resourceType"] == "OperationOutcome"
                    assert "audit journal" in ready["issue"][0]["diagnostics"]
                filler.unlink()
                wait_for(lambda: get(f"{base}/ready")[0] == 200, what="ready once the disk has room")
                load.more(10)
                assert get(f"{base}/health")[1]["status"] == "ok"
            text = stop(process, log)
        assert "cannot append" in text and "the disk is full" in text
        assert_each_answered_call_stored_once(db_url, load.answered)
