"""The service's long-lived parts, built once per process: policies, authenticator, FHIR reader, audit sink."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditSink, NullAudit
from .auth import Authenticator, JtiStore, MemoryJtiStore, build_authenticator
from .fhir_client import CoverageFinder, FhirReader, FhirSettings
from .policy import PolicySet, load_policies


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

    @property
    def public_url(self) -> str:
        return self.settings["PUBLIC_URL"]


def build_runtime(settings: dict[str, Any], *, offline: bool = False) -> Runtime:
    """Everything a call needs, from checked settings; shared by the web app and the command line."""
    policies = load_policies(settings["POLICY_DIR"])
    reader = FhirReader(
        FhirSettings(timeout=settings["FHIR_TIMEOUT"], allow_http=settings["ALLOW_HTTP_FHIR"], offline=offline)
    )
    jti_store: JtiStore = MemoryJtiStore()
    return Runtime(
        settings=settings,
        policies=policies,
        coverage=CoverageFinder(reader),
        authenticator=build_authenticator(settings, jti_store) if settings["AUTH"] == "jwt" else None,
    )
