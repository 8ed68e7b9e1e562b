"""The worker's call pool: at most `cpu_threads` calls compute at once; a call waiting on I/O steps aside."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from cds_service.ops.call_pool import ElasticPool, blocking_io


class Gauge:
    """How many calls run at once, at most."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *_: object) -> None:
        with self.lock:
            self.now -= 1


def test_at_most_cpu_threads_calls_run_at_once() -> None:
    pool = ElasticPool(2, 8)
    gauge = Gauge()

    def call() -> None:
        with gauge:
            time.sleep(0.02)  # a call holding its thread (not inside blocking_io)

    futures = [pool.submit(call) for _ in range(12)]
    for future in futures:
        future.result(timeout=10)
    pool.shutdown()
    assert gauge.most == 2


def test_a_call_waiting_on_io_lets_the_next_call_run() -> None:
    pool = ElasticPool(1, 2)
    waiting = threading.Event()
    release = threading.Event()

    def slow() -> str:
        with blocking_io():
            waiting.set()
            release.wait(10)
        return "slow"

    first = pool.submit(slow)
    assert waiting.wait(5)
    # With one computing thread busy waiting on "a FHIR server", another call still runs at once.
    assert pool.submit(lambda: "fast").result(timeout=2) == "fast"
    assert pool.stats()["waitingOnIo"] == 1
    release.set()
    assert first.result(timeout=5) == "slow"
    pool.shutdown()


def test_spare_threads_bound_the_calls_waiting_on_io() -> None:
    pool = ElasticPool(1, 1)
    release = threading.Event()
    started: list[int] = []

    def slow(i: int) -> None:
        with blocking_io():
            started.append(i)
            release.wait(10)

    futures: list[Future[None]] = [pool.submit(slow, i) for i in range(3)]
    time.sleep(0.2)
    assert sorted(started) == [0, 1]  # two threads in all: the third call waits in the queue
    assert pool.stats()["threads"] == 2
    release.set()
    for future in futures:
        future.result(timeout=5)
    assert sorted(started) == [0, 1, 2]
    pool.shutdown()


def test_errors_reach_the_future_and_blocking_io_outside_a_pool_does_nothing() -> None:
    pool = ElasticPool(2, 0)

    def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        pool.submit(broken).result(timeout=5)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(broken)
    with blocking_io():  # the Flask test client, the command line: no pool, nothing to step aside from
        pass
