"""The patient's Coverage as encounter-start found it, kept briefly in this process for the encounter's later hooks."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from ..engine.crd import CoverageResult

# Bounded: an encounter-start per patient seen in the last TTL seconds, at most this many (the oldest go first).
MAX_ENTRIES = 4096


class CoverageCache:
    """(FHIR server, patient id) -> CoverageResult, for `ttl` seconds; memory only, per process, thread-safe.

    Only answers that say something about the patient's Coverage are kept (found, none, inactive, no member): a
    technical failure is worth another read. The keys hold a patient id, so nothing here is ever logged.
    """

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[float, CoverageResult]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def put(self, server: str, patient: str, result: CoverageResult) -> None:
        if not self.enabled or result.problem == "technical":
            return
        with self._lock:
            self._entries[(server, patient)] = (self._clock() + self.ttl, replace(result, notes=list(result.notes)))
            self._entries.move_to_end((server, patient))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, server: str, patient: str) -> CoverageResult | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get((server, patient))
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[(server, patient)]
                return None
            return replace(entry[1], notes=list(entry[1].notes))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
