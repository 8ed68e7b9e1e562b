"""The service's long-lived parts, built once per process: policies, authenticator, FHIR reader, audit sink."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .audit import AuditSink, NullAudit
from .auth.tokens import Authenticator, JtiStore, MemoryJtiStore, build_authenticator
from .engine.policy import PolicySet, load_policies
from .fhir.breaker import BreakerSettings
from .fhir.client import CoverageFinder, FhirReader, FhirSettings
from .fhir.coverage_cache import CoverageCache

if TYPE_CHECKING:
    from .store import Store


@dataclass
class Runtime:
    settings: dict[str, Any]
    policies: PolicySet
    coverage: CoverageFinder
    authenticator: Authenticator | None
    audit: AuditSink = field(default_factory=NullAudit)
    discovery: list[dict[str, Any]] = field(default_factory=list)
    # Reports the store's state for /health and /ready ({} when there is no store).
    health: Callable[[], dict[str, Any]] = dict
    # Card uuids for a service id: marked as this service's when there is a store (store.card_ids), else random.
    card_id: Callable[[str], str] = field(default=lambda _service: str(uuid.uuid4()))

    @property
    def public_url(self) -> str:
        return str(self.settings["PUBLIC_URL"])


def build_runtime(settings: dict[str, Any], *, offline: bool = False, store: Store | None = None) -> Runtime:
    """Everything a call needs, from checked settings; shared by the web app and the command line.

    With a store (the web app), the audit log and the jti store are the database's, shared by every worker and
    instance; without one (`cds-service evaluate`), nothing is recorded and jtis are remembered in this process.
    """
    policies = load_policies(settings["POLICY_DIR"])
    reader = FhirReader(
        FhirSettings(
            timeout=settings["FHIR_TIMEOUT"],
            allow_http=settings["ALLOW_HTTP_FHIR"],
            offline=offline,
            max_reads=settings["FHIR_MAX_READS"],
            breaker=BreakerSettings(
                failures=settings["FHIR_BREAKER_FAILURES"],
                cooldown=settings["FHIR_BREAKER_COOLDOWN"],
                window=settings["FHIR_BREAKER_WINDOW"],
                # A probe's outcome comes back by its read's deadline; past this, let another call probe.
                probe_lease=settings["FHIR_TIMEOUT"] + 5.0,
            ),
        )
    )
    jti_store: JtiStore = store.jti_store if store is not None else MemoryJtiStore()
    rt = Runtime(
        settings=settings,
        policies=policies,
        coverage=CoverageFinder(reader, CoverageCache(settings["COVERAGE_CACHE_TTL"])),
        authenticator=build_authenticator(settings, jti_store) if settings["AUTH"] == "jwt" else None,
    )
    if store is not None:
        rt.audit = store.audit
        rt.health = store.health
        rt.card_id = store.card_ids.mint
    return rt
