"""Circuit breakers per FHIR server: stop reading from one that keeps failing, probe it again after a cool-down."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..ops import metrics

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
# Servers remembered per process: the fhirServer comes from the caller, so the table must not grow without end.
_MAX_SERVERS = 1000
_MAX_LISTED = 100


def server_key(base: str) -> str:
    """What identifies a FHIR server: scheme, host, port and path of its base URL (never userinfo or a query)."""
    parts = urlsplit(base)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 3  # consecutive failed reads that open the breaker; 0 never opens it
    cooldown: float = 30.0  # seconds open before one probe call may read again
    window: float = 60.0  # a failure this long after the previous one starts the count afresh
    probe_lease: float = 10.0  # a probe that never reports (it always does) stops blocking the next one after this


class BreakerOpen(Exception):
    """The server's breaker is open: do not read from it now (the message says why, safe to log and audit)."""


@dataclass
class _Breaker:
    server: str
    state: str = CLOSED
    failures: int = 0
    last_failure: float = 0.0
    last_error: str | None = None
    opened_at: float = 0.0
    opened_wall: datetime | None = None
    probe_until: float = 0.0
    generation: int = 0  # bumped on every transition: an outcome reported for an older one is stale


class Ticket:
    """Permission for one read; report its outcome once: success(), failure(reason) or cancel() (no read made)."""

    def __init__(self, board: BreakerBoard, breaker: _Breaker, probe: bool) -> None:
        self._board = board
        self._breaker = breaker
        self._generation = breaker.generation
        self.probe = probe
        self._done = False

    def success(self) -> None:
        self._report(lambda b: self._board._succeeded(b, self.probe))

    def failure(self, reason: str) -> None:
        self._report(lambda b: self._board._failed(b, self.probe, reason))

    def cancel(self) -> None:
        self._report(lambda b: self._board._cancelled(b, self.probe))

    def _report(self, apply: Callable[[_Breaker], None]) -> None:
        with self._board._lock:
            if self._done:
                return
            self._done = True
            if self._breaker.generation == self._generation:
                apply(self._breaker)


class BreakerBoard:
    """The breakers of one process (each gunicorn worker keeps its own: state is not shared between workers)."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: OrderedDict[str, _Breaker] = OrderedDict()

    def admit(self, server: str) -> Ticket:
        """A ticket to read from `server`, or BreakerOpen when its breaker says not now."""
        now = self._clock()
        with self._lock:
            breaker = self._breaker(server)
            if breaker.state == CLOSED:
                return Ticket(self, breaker, probe=False)
            if breaker.state == OPEN:
                wait = breaker.opened_at + self.settings.cooldown - now
                if wait > 0:
                    raise BreakerOpen(self._why(breaker, f"next probe in {wait:.0f} s"))
                self._move(breaker, HALF_OPEN)
                breaker.probe_until = now + self.settings.probe_lease
                log.info("FHIR server %s: circuit breaker half-open, one probe call may read", server)
                return Ticket(self, breaker, probe=True)
            if now < breaker.probe_until:
                raise BreakerOpen(self._why(breaker, "a probe call is reading now"))
            # The probe's outcome never came (it always should): let another call probe.
            breaker.generation += 1
            breaker.probe_until = now + self.settings.probe_lease
            return Ticket(self, breaker, probe=True)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per server, for /health: state, consecutive failures, when it opened, the last error (no token, no
        patient data: the reasons are the reader's own words)."""
        with self._lock:
            breakers = list(self._breakers.values())
        order = {OPEN: 0, HALF_OPEN: 1, CLOSED: 2}
        breakers.sort(key=lambda b: (order[b.state], -b.failures, b.server))
        out = []
        for b in breakers[:_MAX_LISTED]:
            item: dict[str, Any] = {"server": b.server, "state": b.state, "failures": b.failures}
            if b.opened_wall is not None and b.state != CLOSED:
                item["openedAt"] = b.opened_wall.isoformat().replace("+00:00", "Z")
            if b.last_error:
                item["lastError"] = b.last_error
            out.append(item)
        return out

    # -- transitions (lock held) ---------------------------------------------------------------------------------
    def _breaker(self, server: str) -> _Breaker:
        breaker = self._breakers.get(server)
        if breaker is None:
            breaker = self._breakers[server] = _Breaker(server)
            if len(self._breakers) > _MAX_SERVERS:
                self._forget_one()
        else:
            self._breakers.move_to_end(server)
        return breaker

    def _forget_one(self) -> None:
        # The least recently used healthy server; never an open breaker (forgetting it would close it).
        for server, breaker in self._breakers.items():
            if breaker.state == CLOSED:
                del self._breakers[server]
                return

    def _move(self, breaker: _Breaker, state: str) -> None:
        breaker.state = state
        breaker.generation += 1
        metrics.breaker_state(breaker.server, state)

    def _open(self, breaker: _Breaker) -> None:
        self._move(breaker, OPEN)
        breaker.opened_at = self._clock()
        breaker.opened_wall = datetime.now(UTC)

    def _succeeded(self, breaker: _Breaker, probe: bool) -> None:
        breaker.failures = 0
        breaker.last_error = None
        if probe and breaker.state == HALF_OPEN:
            self._move(breaker, CLOSED)
            log.warning("FHIR server %s: circuit breaker closed, the probe call read successfully", breaker.server)

    def _failed(self, breaker: _Breaker, probe: bool, reason: str) -> None:
        now = self._clock()
        if breaker.failures and now - breaker.last_failure > self.settings.window:
            breaker.failures = 0  # the earlier failures are too old to say the server is down now
        breaker.failures += 1
        breaker.last_failure = now
        breaker.last_error = reason
        if probe and breaker.state == HALF_OPEN:
            self._open(breaker)
            log.warning(
                "FHIR server %s: circuit breaker open again, the probe call failed (%s); next probe in %g s",
                breaker.server,
                reason,
                self.settings.cooldown,
            )
        elif breaker.state == CLOSED and 0 < self.settings.failures <= breaker.failures:
            self._open(breaker)
            log.warning(
                "FHIR server %s: circuit breaker open after %d consecutive failed reads (last: %s); calls answer "
                "without reading it for %g s",
                breaker.server,
                breaker.failures,
                reason,
                self.settings.cooldown,
            )

    def _cancelled(self, breaker: _Breaker, probe: bool) -> None:
        if probe and breaker.state == HALF_OPEN:
            # The probe made no read (no read slot free): back to open, and the next call may probe at once.
            self._move(breaker, OPEN)
            breaker.probe_until = 0.0
            log.info(
                "FHIR server %s: circuit breaker open, the probe call made no read; the next call probes",
                breaker.server,
            )

    def _why(self, breaker: _Breaker, then: str) -> str:
        since = breaker.opened_wall.strftime("%H:%M:%SZ") if breaker.opened_wall else "?"
        return (
            f"FHIR server {breaker.server} is failing (circuit breaker open since {since}, last error: "
            f"{breaker.last_error}); read skipped, {then}"
        )
