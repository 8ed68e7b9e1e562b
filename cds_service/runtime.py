"""The composition root: the service's long-lived parts built once per process from Settings, and the one accessor."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .audit import AuditSink, NullAudit
from .auth.tokens import Authenticator, JtiStore, build_authenticator
from .config import Settings
from .engine import discovery_entries
from .engine.policy import PolicySet, load_policies
from .fhir.breaker import BreakerSettings
from .fhir.client import FhirReader, FhirSettings
from .fhir.coverage import CoverageFinder
from .fhir.coverage_cache import CoverageCache
from .store.jti import MemoryJtiStore

if TYPE_CHECKING:
    from flask import Flask

    from .ops.reload import PolicyReloader
    from .store import Store

_EXTENSION = "cds_service"  # the one app.extensions key; read only through services_of()


@dataclass(frozen=True)
class Runtime:
    """What a call needs, immutable: a policy reload builds a new one (`with_policies`) and swaps it in one step."""

    settings: Settings
    policies: PolicySet
    coverage: CoverageFinder
    authenticator: Authenticator | None
    audit: AuditSink = field(default_factory=NullAudit)
    # Card uuids for a service id: marked as this service's when there is a store (store.card_ids), else random.
    card_id: Callable[[str], str] = field(default=lambda _service: str(uuid.uuid4()))

    @property
    def public_url(self) -> str:
        return self.settings.public_url

    @cached_property
    def discovery(self) -> list[dict[str, Any]]:
        """The discovery entries: derived from the policy set, so they change exactly when the policies do."""
        return discovery_entries(self.policies)

    def with_policies(self, policies: PolicySet) -> Runtime:
        return dataclasses.replace(self, policies=policies)

    def with_audit(self, audit: AuditSink) -> Runtime:
        return dataclasses.replace(self, audit=audit)


@dataclass
class Services:
    """Everything the app holds for its lifetime, under one typed name. `runtime` is the only part that changes (a
    policy reload assigns a new one); the rest is built once by create_app."""

    runtime: Runtime
    store: Store
    # gunicorn server hooks contributed by the store and the operations (ops/operate.py combines them).
    server_hooks: dict[str, Any] = field(default_factory=dict)
    # Set by ops/operate.install right after: it switches `runtime`, so it is built on these Services.
    reloader: PolicyReloader = field(init=False)

    def health(self) -> dict[str, Any]:
        """The /health and /ready fields: the store's state and the policies answering (with the last reload)."""
        return {
            **self.store.health(),
            **self.reloader.health(),
        }


def services_of(app: Flask) -> Services:
    """The app's Services (create_app put them there)."""
    found: Services = app.extensions[_EXTENSION]
    return found


def attach(app: Flask, parts: Services) -> None:
    app.extensions[_EXTENSION] = parts


def build_runtime(
    settings: Settings,
    *,
    offline: bool = False,
    store: Store | None = None,
    observe: Callable[[AuditSink], AuditSink] | None = None,
) -> Runtime:
    """Everything a call needs, from checked settings; the web app, the command line and reload all use it.

    With a store (the web app), the audit log and the jti store are the database's, shared by every worker and
    instance; without one (`cds-service evaluate`), nothing is recorded and jtis are remembered in this process.
    `observe` wraps the audit sink (metrics and the call's log line see every record).
    """
    policies = load_policies(settings.policy_dir)
    reader = FhirReader(
        FhirSettings(
            timeout=settings.fhir_timeout,
            allow_http=settings.allow_http_fhir,
            offline=offline,
            max_reads=settings.fhir_max_reads,
            breaker=BreakerSettings(
                failures=settings.fhir_breaker_failures,
                cooldown=settings.fhir_breaker_cooldown,
                window=settings.fhir_breaker_window,
                # A probe's outcome comes back by its read's deadline; past this, let another call probe.
                probe_lease=settings.fhir_timeout + 5.0,
            ),
        )
    )
    jti_store: JtiStore = store.jti_store if store is not None else MemoryJtiStore()
    audit: AuditSink = store.audit if store is not None else NullAudit()
    return Runtime(
        settings=settings,
        policies=policies,
        coverage=CoverageFinder(reader, CoverageCache(settings.coverage_cache_ttl)),
        authenticator=build_authenticator(settings.trusted_issuers, jti_store) if settings.auth == "jwt" else None,
        audit=observe(audit) if observe is not None else audit,
        card_id=store.card_ids.mint if store is not None else (lambda _service: str(uuid.uuid4())),
    )
