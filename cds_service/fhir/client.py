"""Data the policies need: from the request's prefetch, else read from the client's FHIR server within a deadline."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

import orjson
import requests
import urllib3

from ..engine.crd import (
    COVERAGE_NOT_FOUND,
    NO_ACTIVE_COVERAGE,
    NO_MEMBER_FOUND,
    TECHNICAL,
    CoverageResult,
)
from ..engine.orders import as_list
from ..errors import ServiceError
from ..ops import metrics, tracing
from ..ops.call_pool import blocking_io
from .breaker import BreakerBoard, BreakerOpen, BreakerSettings, server_key
from .coverage_cache import CoverageCache

if TYPE_CHECKING:
    from ..engine.policy import PrefetchKey
    from ..engine.request import HookRequest

log = logging.getLogger(__name__)

_MAX_PAGES = 3
_MAX_BODY = 5 * 1024 * 1024
_TOKEN = re.compile(r"\{\{\s*context\.(\w+)\s*\}\}")
_ABSENT = object()
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


# -- a wall-clock deadline for every socket operation of a read ---------------------------------------------------
#
# requests applies its timeout to each socket operation: a server that sends one byte every 0.3 s never trips a 3 s
# read timeout. Here the reading thread carries a deadline, and every connect, TLS handshake, send and receive on
# the read's sockets gets the time left as its timeout, so the read ends by itself at the deadline whatever the
# server does. (The caller also stops waiting at the deadline: see FhirReader.read.)

_deadline = threading.local()


def _time_left() -> float | None:
    """Seconds left for the current thread's read; None outside a read. TimeoutError once it has passed."""
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return None
    left = at - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every send and receive waits at most until the reading thread's deadline."""

    def _limit(self) -> None:
        left = _time_left()
        if left is not None:
            self.settimeout(left)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._limit()
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._limit()
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._limit()
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._limit()
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS socket (SSLContext.sslsocket_class): the handshake and every read and write end by the deadline."""

    def _limit(self) -> None:
        left = _time_left()
        if left is not None:
            self.settimeout(left)

    def do_handshake(self, block: bool = False) -> None:
        self._limit()
        super().do_handshake(block)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._limit()
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self._limit()
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._limit()
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._limit()
        super().sendall(data, flags)


def _adopt(sock: socket.socket) -> _DeadlineSocket:
    timeout = sock.gettimeout()
    adopted = _DeadlineSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    adopted.settimeout(timeout)
    adopted._limit()  # the TLS handshake starts from this timeout
    return adopted


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _adopt(super()._new_conn())


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _adopt(super()._new_conn())

    def connect(self) -> None:
        if self.ssl_context is None:
            # What urllib3 builds by default (certificates and host names verified, CA bundle from requests), but
            # wrapping into a socket that keeps the deadline.
            context = urllib3.util.ssl_.create_urllib3_context()
            context.sslsocket_class = _DeadlineSSLSocket
            self.ssl_context = context
        super().connect()


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections keep the reading thread's deadline."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


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
        adapter = _DeadlineAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
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
        _deadline.at = deadline
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
            _deadline.at = None
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


def choose_coverage(resources: list[Any], notes: list[str]) -> str | None:
    """The patient's active Coverage; with several, the first by Coverage.order (then as listed)."""
    return classify(resources, notes).coverage_reference


def _ended(resource: dict[str, Any], today: date) -> bool:
    end = resource.get("period", {}).get("end") if isinstance(resource.get("period"), dict) else None
    return isinstance(end, str) and len(end) >= 10 and end[:10] < today.isoformat()


def classify(resources: list[Any], notes: list[str], today: date | None = None) -> CoverageResult:
    """What the Coverages found say (CRD 2.2.1 resp-45): one active Coverage (the first by Coverage.order, then as
    listed: what CRD 2.0 clients get, as before); none active but one found (no-active-coverage, naming it); none
    at all, or several active ones Coverage.order cannot tell apart (coverage-not-found)."""
    today = today or date.today()
    active = []
    inactive = []
    for position, resource in enumerate(resources):
        if not isinstance(resource, dict) or resource.get("resourceType") != "Coverage":
            continue
        if not isinstance(resource.get("id"), str):
            continue
        if resource.get("status", "active") != "active" or _ended(resource, today):
            if resource.get("status") != "entered-in-error":
                inactive.append(f"Coverage/{resource['id']}")
            continue
        order = resource.get("order")
        rank = order if isinstance(order, int) and not isinstance(order, bool) else 1 << 30
        active.append((rank, position, resource["id"]))
    if not active:
        if inactive:
            return CoverageResult(
                None, notes, NO_ACTIVE_COVERAGE, "The patient's coverage was found but is not active.", inactive[0]
            )
        return CoverageResult(None, notes, COVERAGE_NOT_FOUND, "No coverage was found for the patient.")
    active.sort()
    chosen = f"Coverage/{active[0][2]}"
    if len(active) > 1:
        notes.append(f"{len(active)} active Coverages; chose {chosen} (first by Coverage.order)")
        if active[0][0] == active[1][0]:
            return CoverageResult(
                chosen,
                notes,
                COVERAGE_NOT_FOUND,
                f"{len(active)} active coverages were found and Coverage.order does not tell which applies.",
            )
    return CoverageResult(chosen, notes)


def _technical(notes: list[str], detail: str) -> CoverageResult:
    return CoverageResult(None, notes, TECHNICAL, detail)


class CoverageFinder:
    """Finds the patient's Coverage for a call: prefetch first, then what encounter-start read (the cache), then
    the client's FHIR server; and reads the orders a hook names by reference."""

    def __init__(self, reader: FhirReader, cache: CoverageCache | None = None) -> None:
        self.reader = reader
        self.cache = cache

    def _cache_key(self, request: HookRequest) -> tuple[str, str] | None:
        if not request.fhir_server or not request.patient_id:
            return None
        # Per FHIR server, patient and the OAuth client the EHR's token was issued to (fhirAuthorization.subject):
        # two clients that share a FHIR server URL never see each other's Coverage.
        client = (request.fhir_authorization or {}).get("subject")
        server = (
            f"{request.fhir_server.rstrip('/')} {client}"
            if isinstance(client, str) and client
            else request.fhir_server.rstrip("/")
        )
        return server, request.patient_id

    def resolve(self, request: HookRequest, keys: dict[str, PrefetchKey]) -> CoverageResult:
        """The Coverage, or why there is none. A patient the request does not name, or whose prefetch came back
        empty, is no member (CRD 2.2.1 resp-44) unless a Coverage was found for them all the same."""
        found = self._resolve(request, keys)
        if found.coverage_reference is not None:
            return found
        if request.patient_id is None:
            found.notes.append("the request names no patient")
            return CoverageResult(None, found.notes, NO_MEMBER_FOUND, "The request names no patient.")
        patient = (request.prefetch or {}).get("patient", _ABSENT)
        if patient is None or (isinstance(patient, dict) and patient.get("resourceType") == "OperationOutcome"):
            found.notes.append("prefetch patient is empty: the client could not find the patient")
            return CoverageResult(None, found.notes, NO_MEMBER_FOUND, "The patient could not be found.")
        return found

    def _resolve(self, request: HookRequest, keys: dict[str, PrefetchKey]) -> CoverageResult:
        notes: list[str] = []
        key = keys.get("coverage")
        value = (request.prefetch or {}).get("coverage", _ABSENT) if key else _ABSENT
        if value is None:
            notes.append("prefetch coverage is null: the patient has no active Coverage")
            return CoverageResult(None, notes, COVERAGE_NOT_FOUND, "No active coverage was found for the patient.")
        if isinstance(value, dict):
            kind = value.get("resourceType")
            if kind == "Coverage":
                return classify([value], notes)
            if kind == "Bundle":
                entries = [e.get("resource") for e in as_list(value.get("entry")) if isinstance(e, dict)]
                found = classify(entries, notes)
                if found.coverage_reference is None:
                    notes.append("prefetch coverage has no active one")
                return found
            if kind == "OperationOutcome":
                notes.append("prefetch coverage is an OperationOutcome: the client could not read it")
        elif value is not _ABSENT:
            notes.append("prefetch coverage is not a resource; ignored")
        cache_key = self._cache_key(request)
        if self.cache is not None and cache_key is not None:
            cached = self.cache.get(*cache_key)
            if cached is not None:
                cached.notes.append("Coverage as read at encounter-start (cached)")
                return cached
        if key is None or not request.fhir_server:
            notes.append("Coverage unknown: no prefetch and no fhirServer")
            return _technical(notes, "The request carried no Coverage prefetch and no fhirServer to read it from.")
        query = fill_template(key.query, request.context)
        if query is None:
            notes.append("Coverage unknown: the context lacks what the coverage query needs")
            return _technical(notes, "The request's context lacks what the Coverage query needs.")
        try:
            resources = self._read(request, "coverage", query)
        except FetchError as exc:
            if exc.skipped:
                # An open breaker or full read slots: logged when that state began, not again for every call.
                log.debug("coverage read skipped for hookInstance %s: %s", request.hook_instance, exc)
                notes.append(f"Coverage unknown: {exc}")
                if str(exc) == OFFLINE:
                    return CoverageResult(None, notes)  # evaluating offline: nothing failed, nothing was read
            else:
                log.warning("coverage read failed for hookInstance %s: %s", request.hook_instance, exc)
                notes.append(f"Coverage unknown: reading it from the FHIR server failed ({exc})")
            if exc.status in (404, 410):
                # The server does not know the patient the search names: CRD 2.2.1 resp-44.
                return CoverageResult(None, notes, NO_MEMBER_FOUND, "The EHR's FHIR server does not know the patient.")
            return _technical(notes, f"Reading the patient's coverage from the EHR's FHIR server failed ({exc}).")
        found = classify(resources, notes)
        if found.coverage_reference is None:
            notes.append("the FHIR server has no active Coverage for the patient")
        return found

    def warm(self, request: HookRequest, keys: dict[str, PrefetchKey]) -> str:
        """encounter-start (CRD ops-1): keep the patient's Coverage for the encounter's later hooks. The call is
        answered at once: a read from the FHIR server runs on its own thread, under the usual deadline, read slots
        and breaker. Returns what was done, for the audit notes."""
        cache_key = self._cache_key(request)
        if self.cache is None or not self.cache.enabled or cache_key is None:
            return "Coverage cache off, or no fhirServer and patient to key it by"
        if self.cache.get(*cache_key) is not None:
            return "Coverage already cached"
        value = (request.prefetch or {}).get("coverage", _ABSENT)
        if isinstance(value, dict) and value.get("resourceType") in ("Coverage", "Bundle"):
            self.cache.put(*cache_key, self.resolve(request, keys))
            return "Coverage cached from prefetch"
        if keys.get("coverage") is None or self.reader.settings.offline:
            return "no Coverage prefetch and no read possible"

        cache = self.cache

        def read() -> None:
            try:
                cache.put(*cache_key, self.resolve(request, keys))
            except Exception as exc:  # a bug must not go unseen, nor take the patient's id into the log
                log.error("encounter-start Coverage read failed unexpectedly: %s", type(exc).__name__)

        threading.Thread(target=read, name="cds-coverage-warm", daemon=True).start()
        return "Coverage read started"

    def read_orders(self, request: HookRequest, references: list[str]) -> tuple[dict[str, dict[str, Any]], str]:
        """The ServiceRequests a hook names that its prefetch lacked, read with the request's bearer token under the
        same deadline, read slots and breaker as the Coverage read; what is missing stays unread, with why."""
        ids = [ref.split("/", 1)[1] for ref in references if ref.startswith("ServiceRequest/")]
        if not ids:
            return {}, ""
        if not request.fhir_server:
            return {}, "no prefetch and no fhirServer to read it from"
        query = "ServiceRequest?_id=" + ",".join(quote(i, safe="") for i in ids)
        try:
            resources = self._read(request, "serviceRequests", query)
        except FetchError as exc:
            if not exc.skipped:
                log.warning("order read failed for hookInstance %s: %s", request.hook_instance, exc)
            return {}, str(exc)
        found = {
            f"ServiceRequest/{r['id']}": r
            for r in resources
            if r.get("resourceType") == "ServiceRequest" and isinstance(r.get("id"), str)
        }
        return found, ""

    def _read(self, request: HookRequest, name: str, query: str) -> list[dict[str, Any]]:
        if name not in request.fetched:
            started = time.perf_counter()
            try:
                request.fetched[name] = self.reader.read(request.fhir_server or "", query, request.access_token)
            except FetchError as exc:
                # "skipped": no read was attempted (an open circuit breaker, no free read slot, reads off).
                outcome = "skipped" if getattr(exc, "skipped", False) else "error"
                metrics.fhir_read(outcome, time.perf_counter() - started)
                raise
            metrics.fhir_read("ok", time.perf_counter() - started)
        return request.fetched[name]

    def require(self, request: HookRequest, keys: dict[str, PrefetchKey]) -> None:
        """412 when a key the policies declare required can be neither prefetched nor read (CDS Hooks 2.0)."""
        for name, key in keys.items():
            if not key.required:
                continue
            value = (request.prefetch or {}).get(name, _ABSENT)
            if isinstance(value, dict) and value.get("resourceType") != "OperationOutcome":
                continue
            if value is None:
                continue  # the client looked and found nothing: that is an answer, not missing data
            query = fill_template(key.query, request.context)
            if request.fhir_server and query is not None:
                try:
                    self._read(request, name, query)
                    continue
                except FetchError as exc:
                    log.warning(
                        "required prefetch %r unreadable for hookInstance %s: %s", name, request.hook_instance, exc
                    )
            raise ServiceError(
                412,
                f"Required prefetch '{name}' was not provided and could not be read from the FHIR server.",
                expression=f"prefetch.{name}",
                code="incomplete",
            )
