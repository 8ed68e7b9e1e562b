"""The patient's Coverage as encounter-start found it, kept briefly in this process for the encounter's later hooks."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from ..engine.crd import CoverageResult

# Bounded: an encounter-start per patient seen in the last TTL seconds, at most this many (the oldest go first).
MAX_ENTRIES = 4096


class CacheKey(NamedTuple):
    """Whose Coverage: the FHIR server, the OAuth client the EHR's token was issued to (fhirAuthorization.subject,
    "" when the request names none) and the patient. Two clients sharing a FHIR server URL never share an entry."""

    server: str
    client: str
    patient: str


class CoverageCache:
    """(FHIR server, client, patient id) -> CoverageResult, for `ttl` seconds; memory only, per process, thread-safe.

    Only answers that say something about the patient's Coverage are kept (found, none, inactive, no member): a
    technical failure is worth another read. The keys hold a patient id, so nothing here is ever logged.
    """

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, tuple[float, CoverageResult]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def put(self, key: CacheKey, result: CoverageResult) -> None:
        if not self.enabled or result.problem == "technical":
            return
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl, replace(result, notes=list(result.notes)))
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, key: CacheKey) -> CoverageResult | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return replace(entry[1], notes=list(entry[1].notes))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
