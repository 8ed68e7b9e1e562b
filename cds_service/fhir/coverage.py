"""The patient's Coverage for a call (prefetch, the encounter-start cache, else a FHIR read) and the orders a hook
names by reference; which Coverage applies, by CRD's rules."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..engine.crd import (
    COVERAGE_NOT_FOUND,
    NO_ACTIVE_COVERAGE,
    NO_MEMBER_FOUND,
    TECHNICAL,
    CoverageResult,
)
from ..engine.orders import as_list
from ..errors import ServiceError
from ..ops import metrics
from .client import OFFLINE, FetchError, FhirReader, fill_template
from .coverage_cache import CacheKey, CoverageCache

if TYPE_CHECKING:
    from ..engine.policy import PrefetchKey
    from ..engine.request import HookRequest

# The logger these lines were always written under: operators filter the service's logs by it.
log = logging.getLogger("cds_service.fhir.client")

_ABSENT = object()


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
        self._fetched_lock = threading.Lock()
        self._fetched_by_call: weakref.WeakKeyDictionary[HookRequest, dict[str, list[dict[str, Any]]]] = (
            weakref.WeakKeyDictionary()
        )

    def _cache_key(self, request: HookRequest) -> CacheKey | None:
        if not request.fhir_server or not request.patient_id:
            return None
        client = (request.fhir_authorization or {}).get("subject")
        return CacheKey(request.fhir_server.rstrip("/"), client if isinstance(client, str) else "", request.patient_id)

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
            cached = self.cache.get(cache_key)
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
        if self.cache.get(cache_key) is not None:
            return "Coverage already cached"
        value = (request.prefetch or {}).get("coverage", _ABSENT)
        if isinstance(value, dict) and value.get("resourceType") in ("Coverage", "Bundle"):
            self.cache.put(cache_key, self.resolve(request, keys))
            return "Coverage cached from prefetch"
        if keys.get("coverage") is None or self.reader.settings.offline:
            return "no Coverage prefetch and no read possible"

        cache = self.cache

        def read() -> None:
            try:
                cache.put(cache_key, self.resolve(request, keys))
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

    def _fetched(self, request: HookRequest) -> dict[str, list[dict[str, Any]]]:
        """What this call already read from the FHIR server, by prefetch key, so nothing is read twice: kept here,
        not in the engine's request, and gone with the request (weak keys)."""
        with self._fetched_lock:
            found = self._fetched_by_call.get(request)
            if found is None:
                found = self._fetched_by_call[request] = {}
            return found

    def _read(self, request: HookRequest, name: str, query: str) -> list[dict[str, Any]]:
        fetched = self._fetched(request)
        if name not in fetched:
            started = time.perf_counter()
            try:
                fetched[name] = self.reader.read(request.fhir_server or "", query, request.access_token)
            except FetchError as exc:
                # "skipped": no read was attempted (an open circuit breaker, no free read slot, reads off).
                outcome = "skipped" if getattr(exc, "skipped", False) else "error"
                metrics.fhir_read(outcome, time.perf_counter() - started)
                raise
            metrics.fhir_read("ok", time.perf_counter() - started)
        return fetched[name]

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
