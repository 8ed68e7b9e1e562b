"""A bounded, thread-safe memo for what follows from a policy and an order's read content alone."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most `size` entries, the oldest dropped first. Reads take no lock (a dict lookup is atomic under the GIL);
    writes do, so the bound holds with calls on several threads. EHRs send the same orderables call after call."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
