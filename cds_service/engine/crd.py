"""Da Vinci CRD: configuration options, request configuration, and the coverage-information systemAction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from .decision import Verdict
from .outcome import ActionOutcome
from .policy.model import Service

COVERAGE_INFO_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CONFIG_OPTIONS_KEY = "davinci-crd.configuration-options"
CONFIG_KEY = "davinci-crd.configuration"
# CRD 2.2 (deviations.html, "CRD Version declaration", dev-1/dev-2): each service declares every CRD version it
# supports, as the first two nodes of the IG version; a client then names the one it wants in
# davinci-crd.requestedVersion (dev-3). The responses here are valid under both: the same card types, actions and
# coverage-information shape (no pa-needed with not-covered; no 2.0.1/2.2-specific sub-extensions), and the card
# topic's code system follows the version asked for (temp in 2.0, cdshooks-card-type in 2.2).
VERSION_KEY = "davinci-crd.version"
REQUESTED_VERSION_KEY = "davinci-crd.requestedVersion"
CRD_VERSIONS = ("2.0", "2.2")
MAX_CARDS_DEFAULT = 10
# The Instructions card's switch. CRD dev-7 asks for a code from the CRD response types where one applies; neither
# card-type code system has one for an instructions card, so it is named for what it is.
INSTRUCTIONS = "instructions"


def configuration_options(service: Service) -> list[dict[str, Any]]:
    """CRD discovery configuration options: coverage-info, one boolean per card type (dev-5), max-cards."""
    options: list[dict[str, Any]] = [
        {
            "code": "coverage-info",
            "type": "boolean",
            "name": "Coverage information",
            "description": "Return coverage information (ext-coverage-information) as systemActions that update the "
            "draft order",
            "default": True,
        }
    ]
    seen: set[str] = set()

    def add(code: str, name: str, description: str, default: bool) -> None:
        if code not in seen:
            seen.add(code)
            options.append(
                {"code": code, "type": "boolean", "name": name, "description": description, "default": default}
            )

    for policy in service.policies:
        text = policy.card
        add(
            text.alternative_topic.code,
            f"{text.alternative_topic.display} cards",
            f"Propose the covered alternative order (one suggestion that replaces the flagged order) ({policy.title})",
            True,
        )
        add(
            text.guideline_topic.code,
            f"{text.guideline_topic.display} cards",
            f"The policy and its evidence as links, for a flagged order that gets no alternative card ({policy.title})",
            True,
        )
        if text.instructions_summary:
            # Off by default: clinicians see one card per order unless the EHR asks for more.
            add(
                INSTRUCTIONS,
                "Instructions cards",
                "What happens if a flagged order goes ahead anyway: the claim, billing the patient, exceptions "
                f"({policy.title})",
                False,
            )
    options.append(
        {
            "code": "max-cards",
            "type": "integer",
            "name": "Maximum cards",
            "description": "The most cards to return for one hook call",
            "default": MAX_CARDS_DEFAULT,
        }
    )
    return options


def service_extension(service: Service) -> dict[str, Any]:
    """The CRD extensions of a service's discovery entry."""
    return {VERSION_KEY: list(CRD_VERSIONS), CONFIG_OPTIONS_KEY: configuration_options(service)}


@dataclass
class Configuration:
    """What a client asked for through davinci-crd.configuration; unknown keys are ignored, none are required."""

    coverage_info: bool = True
    card_types: dict[str, bool] = field(default_factory=dict)
    max_cards: int | None = None
    crd_version: str = CRD_VERSIONS[0]

    def card_enabled(self, card_type: str) -> bool:
        # Every card type is on unless switched off, but for the Instructions card, which is off unless asked for.
        return self.card_types.get(card_type, card_type != INSTRUCTIONS)


def read_configuration(extension: dict[str, Any]) -> Configuration:
    config = Configuration()
    if not isinstance(extension, dict):
        return config
    requested = extension.get(REQUESTED_VERSION_KEY)
    if isinstance(requested, str) and requested.strip() in CRD_VERSIONS:
        config.crd_version = requested.strip()
    raw = extension.get(CONFIG_KEY)
    if not isinstance(raw, dict):
        return config
    for key, value in raw.items():
        if key == "coverage-info" and isinstance(value, bool):
            config.coverage_info = value
        elif key == "max-cards":
            # CRD types max-cards as an integer; a bool is not one, a negative count means none.
            if isinstance(value, int) and not isinstance(value, bool):
                config.max_cards = max(value, 0)
        elif isinstance(value, bool):
            config.card_types[str(key)] = value
    return config


@dataclass
class CoverageResult:
    """The patient's Coverage as found (or not) for one call, with notes for the audit log."""

    coverage_reference: str | None
    notes: list[str] = field(default_factory=list)


def _get(value: Any, *keys: str) -> Any:
    """value[k1][k2]... through objects only; None where the client's shape differs."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _same_assertion(existing: Any, coverage: str, covered: str, billing_code: str | None) -> bool:
    if not isinstance(existing, dict) or existing.get("url") != COVERAGE_INFO_URL:
        return False
    nested = existing.get("extension")
    parts = {e.get("url"): e for e in (nested if isinstance(nested, list) else []) if isinstance(e, dict)}
    return bool(
        _get(parts, "coverage", "valueReference", "reference") == coverage
        and _get(parts, "covered", "valueCode") == covered
        and _get(parts, "billingCode", "valueCoding", "code") == billing_code
    )


def coverage_action(verdict: Verdict, coverage_reference: str, today: date) -> ActionOutcome | None:
    """The CRD coverage-information systemAction for a flagged order, or None when it already carries it.

    CRD (ext-coverage-information): coverage, covered, date and coverage-assertion-id are required; with
    not-covered there is no pa-needed (removed in 2.1); "investigational" has no code, so it is not-covered plus
    the reason in text. The resource is the client's own draft, unchanged but for the added extension.
    """
    resource = verdict.order.echo
    if not verdict.order.id:
        return None
    policy = verdict.policy
    billing = verdict.billing_code
    extensions = resource.get("extension")
    if isinstance(extensions, list) and any(
        _same_assertion(e, coverage_reference, policy.covered, billing.code if billing else None) for e in extensions
    ):
        return None
    assertion_id = uuid.uuid4().hex
    parts: list[dict[str, Any]] = [
        {"url": "coverage", "valueReference": {"reference": coverage_reference}},
        {"url": "covered", "valueCode": policy.covered},
    ]
    if billing:
        parts.append({"url": "billingCode", "valueCoding": {"system": billing.system, "code": billing.code}})
    parts += [
        {"url": "reason", "valueCodeableConcept": {"text": policy.coverage_reason}},
        {"url": "date", "valueDate": today.isoformat()},
        {"url": "coverage-assertion-id", "valueString": assertion_id},
    ]
    existing = resource.get("extension", [])
    if not isinstance(existing, list):
        # A malformed extension element cannot be extended without changing its meaning; leave the order alone.
        return None
    # A shallow copy is enough: nothing inside the client's resource is changed, only a new extension list is
    # attached (the request's own dict stays as the client sent it, for the card and the audit log).
    updated = {**resource, "extension": [*existing, {"url": COVERAGE_INFO_URL, "extension": parts}]}
    return ActionOutcome(
        "update",
        verdict.order.reference,
        assertion_id,
        {"type": "update", "description": policy.coverage_action, "resource": updated},
    )
