"""The threads that run calls in a worker: a few compute at once; a call waiting on a FHIR server steps aside."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

# The pool the current thread belongs to (None outside one: the Flask test client, the command line).
_local = threading.local()

_Work = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ElasticPool:
    """An executor (the `submit` / `shutdown` that gunicorn's gthread worker uses) in which at most `cpu_threads`
    threads run calls at once, while up to `spare_threads` more may be waiting on I/O inside `blocking_io()`.

    Calls are CPU-bound Python sharing one GIL: more threads computing at once add switching and tail latency, not
    throughput (bench/README.md: p99 31 ms with 2 threads, 57 ms with 4). But a call that waits seconds on the
    client's FHIR server needs its thread, not the CPU. A thread entering `blocking_io()` stops counting as
    running, and an idle or new thread takes the next queued connection in its place; when the wait ends, the call
    finishes on its thread (briefly one more computing thread, instead of queueing a half-done call).

    A thread that finishes a call takes the next queued one itself, as the standard ThreadPoolExecutor does: the
    common, CPU-bound case has no hand-off between threads (32 threads behind a semaphore of 2 measured 8% more CPU
    per call and p99 40 vs 31 ms: every release woke another thread).
    """

    def __init__(self, cpu_threads: int, spare_threads: int, *, name: str = "cds-call") -> None:
        if cpu_threads < 1 or spare_threads < 0:
            raise ValueError("an elastic pool needs at least one thread")
        self.cpu_threads = cpu_threads
        self.max_threads = cpu_threads + spare_threads
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._work: deque[_Work] = deque()
        self._running = 0  # threads running a call, not counting those inside blocking_io()
        self._aside = 0  # threads inside blocking_io()
        self._threads = 0  # threads alive
        self._idle = 0  # threads waiting for work that nobody has woken yet
        self._waking = 0  # threads woken (or started) that have not looked at the queue yet
        self._shutdown = False

    # -- the executor interface gunicorn uses -----------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.append((future, fn, args, kwargs))
            self._dispatch()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            self._waking += self._idle
            self._idle = 0
            self._cond.notify_all()
        if wait:
            for thread in [t for t in threading.enumerate() if getattr(t, "_cds_pool", None) is self]:
                thread.join()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"threads": self._threads, "running": self._running, "waitingOnIo": self._aside}

    # -- inside ---------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """With the lock held: wake or start as many threads as queued calls can run now."""
        wanted = min(len(self._work), self.cpu_threads - self._running - self._waking)
        while wanted > 0:
            if self._idle:
                self._idle -= 1
                self._waking += 1
                self._cond.notify()
            elif self._threads < self.max_threads:
                self._threads += 1
                self._waking += 1
                thread = threading.Thread(target=self._worker, name=f"{self.name}-{self._threads}", daemon=True)
                thread._cds_pool = self  # type: ignore[attr-defined]
                thread.start()
            else:
                return  # every thread is busy or waiting on I/O: the call waits in the queue
            wanted -= 1

    def _worker(self) -> None:
        _local.pool = self
        with self._cond:
            self._waking -= 1
            while True:
                if self._work and self._running < self.cpu_threads:
                    future, fn, args, kwargs = self._work.popleft()
                    self._running += 1
                    self._cond.release()
                    try:
                        _run(future, fn, args, kwargs)
                    finally:
                        self._cond.acquire()
                        self._running -= 1
                    continue  # take the next queued call on this thread: no hand-off
                if self._shutdown:
                    self._threads -= 1
                    return
                self._idle += 1
                self._cond.wait()
                self._waking -= 1  # whoever notified moved this thread from idle to waking

    def _step_aside(self) -> None:
        with self._cond:
            self._running -= 1
            self._aside += 1
            self._dispatch()

    def _step_back(self) -> None:
        with self._cond:
            self._aside -= 1
            self._running += 1


def _run(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # as concurrent.futures does: the caller reads it from the future
        future.set_exception(exc)
    else:
        future.set_result(result)


@contextmanager
def blocking_io() -> Iterator[None]:
    """Around a wait on another server: the calling pool thread stops counting as running (a no-op elsewhere)."""
    pool: ElasticPool | None = getattr(_local, "pool", None)
    if pool is None or getattr(_local, "aside", False):
        yield
        return
    _local.aside = True
    pool._step_aside()
    try:
        yield
    finally:
        pool._step_back()
        _local.aside = False
