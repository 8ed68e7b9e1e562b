"""Reads from the client's FHIR server: within a deadline, a bounded number in flight, a breaker per server."""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import orjson
import requests
import urllib3

from ..engine.orders import as_list
from ..ops import tracing
from ..ops.call_pool import blocking_io
from .breaker import BreakerBoard, BreakerOpen, BreakerSettings, server_key
from .deadline import DeadlineAdapter, set_deadline

log = logging.getLogger(__name__)

_MAX_PAGES = 3
_MAX_BODY = 5 * 1024 * 1024
_TOKEN = re.compile(r"\{\{\s*context\.(\w+)\s*\}\}")
OFFLINE = "reading from FHIR servers is off"


class FetchError(Exception):
    """The FHIR server could not give an answer in time (reason is safe to log: no token, no patient data).

    `server_fault`: the server failed (it counts towards its circuit breaker); `skipped`: no read was attempted.
    """

    def __init__(
        self, reason: str, *, server_fault: bool = False, skipped: bool = False, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.server_fault = server_fault
        self.skipped = skipped
        self.status = status  # the HTTP status the FHIR server answered, when it answered


@dataclass(frozen=True)
class FhirSettings:
    timeout: float = 3.0
    allow_http: bool = False
    # The command line evaluates offline by default: prefetch only, no network.
    offline: bool = False
    # Reads in flight at once in this process, all servers together; one server gets at most half of them.
    max_reads: int = 16
    breaker: BreakerSettings = field(default_factory=BreakerSettings)


def fill_template(template: str, context: dict[str, Any]) -> str | None:
    """Fill {{context.x}} tokens (URL-quoted); None when the context lacks one, since the query would be wrong."""
    missing = False

    def value(match: re.Match[str]) -> str:
        nonlocal missing
        item = context.get(match.group(1))
        if not isinstance(item, str) or not item:
            missing = True
            return ""
        return quote(item, safe="/")

    filled = _TOKEN.sub(value, template)
    return None if missing or "{{" in filled else filled


class _ReadSlots:
    """How many reads may be in flight in this process: all servers together, and per server (half of that), so a
    hanging server cannot take the slots a healthy one needs, nor the worker's threads."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.per_server = max(1, total // 2)
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def take(self, server: str) -> None:
        with self._lock:
            mine = self._in_flight.get(server, 0)
            if sum(self._in_flight.values()) >= self.total:
                raise FetchError(
                    f"{self.total} FHIR reads already in flight in this worker; read skipped", skipped=True
                )
            if mine >= self.per_server:
                raise FetchError(
                    f"{mine} reads from FHIR server {server} already in flight in this worker; read skipped",
                    skipped=True,
                )
            self._in_flight[server] = mine + 1

    def give(self, server: str) -> None:
        with self._lock:
            left = self._in_flight[server] - 1
            if left:
                self._in_flight[server] = left
            else:
                del self._in_flight[server]

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._in_flight.values())


class _Read:
    """One read running in its own thread; the calling thread waits for `done` until the deadline at most."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.resources: list[dict[str, Any]] = []
        self.error: FetchError | None = None
        self.trace_headers: dict[str, str] = {}


class FhirReader:
    """Reads from a client's FHIR server: pooled connections, bearer token, a wall-clock deadline for the whole
    read, a bounded number of reads in flight, and a circuit breaker per server."""

    def __init__(self, settings: FhirSettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        # Never read proxies or .netrc from the environment: the bearer token goes only where the client said.
        self.session.trust_env = False
        adapter = DeadlineAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.breakers = BreakerBoard(settings.breaker)
        self.slots = _ReadSlots(settings.max_reads)

    def check_server(self, base: str) -> str:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise FetchError("fhirServer is not an http(s) URL")
        if parts.scheme == "http" and not self.settings.allow_http:
            raise FetchError("fhirServer uses plain http (set CDS_ALLOW_HTTP_FHIR to allow it)")
        return base.rstrip("/") + "/"

    def health(self) -> dict[str, Any]:
        """For /health: this process's reads in flight and its breakers (no tokens, no patient data)."""
        return {"fhirReadsInFlight": self.slots.in_flight(), "fhirServers": self.breakers.snapshot()}

    def read(self, base: str, query: str, token: str | None) -> list[dict[str, Any]]:
        """GET {base}/{query}; a searchset is followed for at most a few pages. Returns the resources found.

        The read runs in a thread of its own and the caller waits for it until the deadline at most: that holds
        even where no socket timeout reaches (a name lookup that hangs). The read's sockets keep the same deadline,
        so the thread ends by itself too; the slots bound how many can be in flight.
        """
        with tracing.fhir_read_span(base, query) as span:
            try:
                resources = self._read(base, query, token)
            except FetchError as exc:
                span.set_attribute("cds.fhir.outcome", "skipped" if exc.skipped else "error")
                span.set_attribute("cds.fhir.reason", str(exc))  # safe: no token, no patient data (FetchError)
                raise
            span.set_attribute("cds.fhir.outcome", "ok")
            span.set_attribute("cds.fhir.resources", len(resources))
            return resources

    def _read(self, base: str, query: str, token: str | None) -> list[dict[str, Any]]:
        if self.settings.offline:
            raise FetchError(OFFLINE, skipped=True)
        base = self.check_server(base)
        server = server_key(base)
        try:
            ticket = self.breakers.admit(server)
        except BreakerOpen as exc:
            raise FetchError(str(exc), skipped=True) from None
        try:
            self.slots.take(server)
        except FetchError:
            ticket.cancel()
            raise
        deadline = time.monotonic() + self.settings.timeout
        job = _Read()
        # The read runs in another thread: the current span's traceparent is taken here, in the call's thread.
        job.trace_headers = tracing.trace_headers()
        try:
            threading.Thread(
                target=self._run, args=(job, server, base, query, token, deadline), name="cds-fhir-read", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had (a process limit): answer without the read
            self.slots.give(server)
            ticket.cancel()
            raise FetchError("could not start a thread for the read; read skipped", skipped=True) from None
        # The wait holds no CPU: the worker lets another thread take the next call meanwhile.
        with blocking_io():
            finished = job.done.wait(max(0.0, deadline - time.monotonic()))
        if not finished:
            reason = f"no complete answer within {self.settings.timeout:g} s"
            ticket.failure(reason)
            raise FetchError(reason, server_fault=True)
        if job.error is not None:
            if job.error.server_fault:
                ticket.failure(str(job.error))
            else:
                ticket.success()  # it answered (a 401 or 404 for this call's query): the server itself is up
            raise job.error
        ticket.success()
        return job.resources

    def _run(self, job: _Read, server: str, base: str, query: str, token: str | None, deadline: float) -> None:
        set_deadline(deadline)
        try:
            job.resources = self._read_pages(base, query, token, deadline, job.trace_headers)
        except FetchError as exc:
            job.error = exc
        except Exception as exc:  # a bug must not leave the caller waiting to the deadline or lose the slot
            # Where, not the message: a library's message may quote the URL, and with it the patient's id.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("FHIR read failed unexpectedly: %s at %s:%s", type(exc).__name__, where.filename, where.lineno)
            job.error = FetchError(f"unexpected {type(exc).__name__}", server_fault=True)
        finally:
            set_deadline(None)
            self.slots.give(server)
            job.done.set()

    def _read_pages(
        self, base: str, query: str, token: str | None, deadline: float, trace_headers: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        url: str | None = urljoin(base, query.lstrip("/"))
        headers = {"Accept": "application/fhir+json, application/json", **(trace_headers or {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        resources: list[dict[str, Any]] = []
        pages = 0
        while url and pages < _MAX_PAGES:
            body = self._get(url, headers, deadline)
            pages += 1
            if body.get("resourceType") != "Bundle":
                resources.append(body)
                break
            for entry in as_list(body.get("entry")):
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    resources.append(entry["resource"])
            url = _next_link(body, base)
        return resources

    def _get(self, url: str, headers: dict[str, str], deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("deadline passed before the next page", server_fault=True)
        try:
            with self.session.get(
                url, headers=headers, timeout=(remaining, remaining), stream=True, allow_redirects=False
            ) as response:
                if response.status_code != 200:
                    # 5xx and 429: the server is failing; other answers (401, 404, ...) are about this query.
                    fault = response.status_code >= 500 or response.status_code == 429
                    raise FetchError(
                        f"FHIR server answered {response.status_code}", server_fault=fault, status=response.status_code
                    )
                chunks = []
                size = 0
                for chunk in response.iter_content(65536):
                    size += len(chunk)
                    if size > _MAX_BODY:
                        raise FetchError("FHIR response too large", server_fault=True)
                    chunks.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # Timeouts, refused or cut connections, TLS failures: the exception's name says which, never the URL's
            # query or the token.
            raise FetchError(type(exc).__name__, server_fault=True) from None
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise FetchError("FHIR server sent invalid JSON", server_fault=True) from None
        if not isinstance(body, dict):
            raise FetchError("FHIR server sent a non-resource", server_fault=True)
        return body


def _next_link(bundle: dict[str, Any], base: str) -> str | None:
    for link in as_list(bundle.get("link")):
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            nxt: str = link["url"]
            # Follow pages only on the same server: a next link elsewhere would carry the token away.
            if urlsplit(nxt).netloc == urlsplit(base).netloc:
                return nxt
    return None
