"""Data the policies need: from the request's prefetch, else read from the client's FHIR server within a deadline."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

import orjson
import requests

from . import metrics
from .engine.crd import CoverageResult
from .engine.orders import as_list
from .errors import ServiceError

if TYPE_CHECKING:
    from .engine.policy import PrefetchKey
    from .engine.request import HookRequest

log = logging.getLogger(__name__)

_MAX_PAGES = 3
_MAX_BODY = 5 * 1024 * 1024
_TOKEN = re.compile(r"\{\{\s*context\.(\w+)\s*\}\}")
_ABSENT = object()


class FetchError(Exception):
    """The FHIR server could not give an answer in time (reason is safe to log: no token, no patient data)."""


@dataclass(frozen=True)
class FhirSettings:
    timeout: float = 3.0
    allow_http: bool = False
    # The command line evaluates offline by default: prefetch only, no network.
    offline: bool = False


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


class FhirReader:
    """Reads from a client's FHIR server: pooled connections, bearer token, a hard deadline for the whole read."""

    def __init__(self, settings: FhirSettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        # Never read proxies or .netrc from the environment: the bearer token goes only where the client said.
        self.session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def check_server(self, base: str) -> str:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise FetchError("fhirServer is not an http(s) URL")
        if parts.scheme == "http" and not self.settings.allow_http:
            raise FetchError("fhirServer uses plain http (set CDS_ALLOW_HTTP_FHIR to allow it)")
        return base.rstrip("/") + "/"

    def read(self, base: str, query: str, token: str | None) -> list[dict[str, Any]]:
        """GET {base}/{query}; a searchset is followed for at most a few pages. Returns the resources found."""
        if self.settings.offline:
            raise FetchError("reading from FHIR servers is off")
        base = self.check_server(base)
        deadline = time.monotonic() + self.settings.timeout
        url: str | None = urljoin(base, query.lstrip("/"))
        headers = {"Accept": "application/fhir+json, application/json"}
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
            raise FetchError("deadline passed")
        try:
            with self.session.get(
                url, headers=headers, timeout=(remaining, remaining), stream=True, allow_redirects=False
            ) as response:
                if response.status_code != 200:
                    raise FetchError(f"FHIR server answered {response.status_code}")
                chunks = []
                size = 0
                for chunk in response.iter_content(65536):
                    size += len(chunk)
                    if size > _MAX_BODY:
                        raise FetchError("FHIR response too large")
                    if time.monotonic() > deadline:
                        raise FetchError("deadline passed while reading")
                    chunks.append(chunk)
        except requests.RequestException as exc:
            raise FetchError(type(exc).__name__) from None
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise FetchError("FHIR server sent invalid JSON") from None
        if not isinstance(body, dict):
            raise FetchError("FHIR server sent a non-resource")
        return body


def _next_link(bundle: dict[str, Any], base: str) -> str | None:
    for link in as_list(bundle.get("link")):
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            nxt = link["url"]
            # Follow pages only on the same server: a next link elsewhere would carry the token away.
            if urlsplit(nxt).netloc == urlsplit(base).netloc:
                return nxt
    return None


def choose_coverage(resources: list[Any], notes: list[str]) -> str | None:
    """The patient's active Coverage; with several, the first by Coverage.order (then as listed)."""
    active = []
    for position, resource in enumerate(resources):
        if not isinstance(resource, dict) or resource.get("resourceType") != "Coverage":
            continue
        if resource.get("status", "active") != "active" or not isinstance(resource.get("id"), str):
            continue
        order = resource.get("order")
        rank = order if isinstance(order, int) and not isinstance(order, bool) else 1 << 30
        active.append((rank, position, resource["id"]))
    if not active:
        return None
    active.sort()
    chosen = f"Coverage/{active[0][2]}"
    if len(active) > 1:
        notes.append(f"{len(active)} active Coverages; chose {chosen} (first by Coverage.order)")
    return chosen


class CoverageFinder:
    """Finds the patient's Coverage for a call: prefetch first, then the client's FHIR server."""

    def __init__(self, reader: FhirReader) -> None:
        self.reader = reader

    def resolve(self, request: HookRequest, keys: dict[str, PrefetchKey]) -> CoverageResult:
        notes: list[str] = []
        key = keys.get("coverage")
        value = (request.prefetch or {}).get("coverage", _ABSENT) if key else _ABSENT
        if value is None:
            return CoverageResult(None, ["prefetch coverage is null: the patient has no active Coverage"])
        if isinstance(value, dict):
            kind = value.get("resourceType")
            if kind == "Coverage":
                return CoverageResult(choose_coverage([value], notes), notes)
            if kind == "Bundle":
                entries = [e.get("resource") for e in as_list(value.get("entry")) if isinstance(e, dict)]
                chosen = choose_coverage(entries, notes)
                return CoverageResult(chosen, notes or ([] if chosen else ["prefetch coverage has no active one"]))
            if kind == "OperationOutcome":
                notes.append("prefetch coverage is an OperationOutcome: the client could not read it")
        elif value is not _ABSENT:
            notes.append("prefetch coverage is not a resource; ignored")
        if key is None or not request.fhir_server:
            notes.append("Coverage unknown: no prefetch and no fhirServer")
            return CoverageResult(None, notes)
        query = fill_template(key.query, request.context)
        if query is None:
            notes.append("Coverage unknown: the context lacks what the coverage query needs")
            return CoverageResult(None, notes)
        try:
            resources = self._read(request, "coverage", query)
        except FetchError as exc:
            log.warning("coverage read failed for hookInstance %s: %s", request.hook_instance, exc)
            notes.append(f"Coverage unknown: reading it from the FHIR server failed ({exc})")
            return CoverageResult(None, notes)
        chosen = choose_coverage(resources, notes)
        if chosen is None:
            notes.append("the FHIR server has no active Coverage for the patient")
        return CoverageResult(chosen, notes)

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
