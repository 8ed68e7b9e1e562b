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


# CRD's CodeSystem temp: the coverage-assertion reasons (CRD 2.2.1 resp-43/44/45; CRDTempCodes.fsh).
CRD_TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
TECHNICAL = "technical"
NO_MEMBER_FOUND = "no-member-found"
COVERAGE_NOT_FOUND = "coverage-not-found"
NO_ACTIVE_COVERAGE = "no-active-coverage"
REASON_DISPLAY = {
    TECHNICAL: "Technical issues",
    NO_MEMBER_FOUND: "Member not found",
    COVERAGE_NOT_FOUND: "Coverage not found",
    NO_ACTIVE_COVERAGE: "Coverage not active",
}
CoverageProblem = str  # one of the four codes above


@dataclass
class CoverageResult:
    """The patient's Coverage as found (or not) for one call, with notes for the audit log.

    `coverage_reference` is what CRD 2.0.1 answers with (today's choice, kept for 2.0 clients); `problem` says why
    no single active Coverage could be named (a CRD 2.2 reason code) and `detail` says it in words safe to send
    (no token, no patient data); `named` is a Coverage the answer can still point at (the inactive one).
    """

    coverage_reference: str | None
    notes: list[str] = field(default_factory=list)
    problem: CoverageProblem | None = None
    detail: str = ""
    named: str | None = None


@dataclass(frozen=True)
class Assertion:
    """What one coverage-information repetition says, before its date and assertion id."""

    coverage: dict[str, Any]  # the valueReference
    covered: str
    pa_needed: str | None
    reason_code: str | None
    reason_text: str
    billing: tuple[str, str] | None
    description: str

    def key(self) -> tuple[Any, ...]:
        """What makes two assertions the same (CRD 2.2.1 resp-35: nothing is resent unless something is new)."""
        return (self.coverage.get("reference"), self.covered, self.pa_needed, self.reason_code, self.billing)


def _get(value: Any, *keys: str) -> Any:
    """value[k1][k2]... through objects only; None where the client's shape differs."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _existing_key(extension: Any) -> tuple[Any, ...] | None:
    """The key of a coverage-information extension already on a resource (None for anything else)."""
    if not isinstance(extension, dict) or extension.get("url") != COVERAGE_INFO_URL:
        return None
    nested = extension.get("extension")
    parts = {e.get("url"): e for e in (nested if isinstance(nested, list) else []) if isinstance(e, dict)}
    reasons = _get(parts, "reason", "valueCodeableConcept", "coding")
    reason = next((c.get("code") for c in (reasons if isinstance(reasons, list) else []) if isinstance(c, dict)), None)
    billing = _get(parts, "billingCode", "valueCoding")
    return (
        _get(parts, "coverage", "valueReference", "reference"),
        _get(parts, "covered", "valueCode"),
        _get(parts, "pa-needed", "valueCode"),
        reason,
        (billing.get("system"), billing.get("code")) if isinstance(billing, dict) else None,
    )


def _absent_coverage(text: str) -> dict[str, Any]:
    """coverage is 1..1 Reference(Coverage) in ext-coverage-information; with no Coverage to name, the reference
    says so in words and carries FHIR's data-absent-reason (unknown) instead of a made-up id."""
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}], "display": text}


def problem_assertion(
    problem: CoverageProblem, detail: str, named: str | None, verdict: Verdict | None, description: str
) -> Assertion:
    """CRD 2.2.1 resp-43: a technical failure is `indeterminate` (covered and pa-needed, as crd-ci-q2 wants a
    pa-needed beside anything but not-covered) with reason `technical` and the details in reason.text;
    resp-44/45: no member, no active coverage, no single coverage are `not-covered` with their reason code."""
    billing = verdict.billing_code if verdict is not None else None
    coverage = {"reference": named} if named else _absent_coverage(REASON_DISPLAY[problem])
    technical = problem == TECHNICAL
    return Assertion(
        coverage=coverage,
        covered="indeterminate" if technical else "not-covered",
        pa_needed="indeterminate" if technical else None,
        reason_code=problem,
        reason_text=detail or REASON_DISPLAY[problem],
        billing=(billing.system, billing.code) if billing else None,
        description=description,
    )


def policy_assertion(verdict: Verdict, coverage_reference: str) -> Assertion:
    """The policy's own answer for a flagged order under the patient's Coverage.

    CRD (ext-coverage-information): coverage, covered, date and coverage-assertion-id are required; with
    not-covered there is no pa-needed (removed in 2.1); "investigational" has no code, so it is not-covered plus
    the reason in text.
    """
    policy = verdict.policy
    billing = verdict.billing_code
    return Assertion(
        coverage={"reference": coverage_reference},
        covered=policy.covered,
        pa_needed=None,
        reason_code=None,
        reason_text=policy.coverage_reason,
        billing=(billing.system, billing.code) if billing else None,
        description=policy.coverage_action,
    )


def _parts(assertion: Assertion, today: date, assertion_id: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"url": "coverage", "valueReference": assertion.coverage},
        {"url": "covered", "valueCode": assertion.covered},
    ]
    if assertion.pa_needed:
        parts.append({"url": "pa-needed", "valueCode": assertion.pa_needed})
    if assertion.billing:
        parts.append(
            {"url": "billingCode", "valueCoding": {"system": assertion.billing[0], "code": assertion.billing[1]}}
        )
    reason: dict[str, Any] = {"text": assertion.reason_text}
    if assertion.reason_code:
        reason = {
            "coding": [
                {"system": CRD_TEMP, "code": assertion.reason_code, "display": REASON_DISPLAY[assertion.reason_code]}
            ],
            "text": assertion.reason_text,
        }
    parts += [
        {"url": "reason", "valueCodeableConcept": reason},
        {"url": "date", "valueDate": today.isoformat()},
        {"url": "coverage-assertion-id", "valueString": assertion_id},
    ]
    return parts


def coverage_update(
    target: dict[str, Any], reference: str | None, assertions: list[Assertion], today: date
) -> ActionOutcome | None:
    """One coverage-information systemAction for one in-scope resource (CRD 2.2.1 resp-29), or None when the
    resource already says all of it (resp-35) or its extension element cannot be extended.

    The resource is the client's own, unchanged but for coverage-information extensions (resp-37): ours are added,
    and an earlier one about the same Coverage is replaced, so repetitions about one Coverage share one
    coverage-assertion-id and those about different ones do not (the kit's check of cards.html).
    """
    existing = target.get("extension", [])
    if not isinstance(existing, list):
        # A malformed extension element cannot be extended without changing its meaning; leave the order alone.
        return None
    unique: dict[tuple[Any, ...], Assertion] = {}
    for assertion in assertions:
        unique.setdefault(assertion.key(), assertion)
    held = {key for e in existing if (key := _existing_key(e)) is not None}
    if not unique or set(unique) <= held:
        return None
    assertion_id = uuid.uuid4().hex
    # Replaced: an earlier assertion about a Coverage asserted again, and an earlier "no Coverage could be named"
    # (any new answer supersedes it); kept: other extensions, and assertions about other Coverages.
    coverages = {key[0] for key in unique}
    kept = [e for e in existing if (key := _existing_key(e)) is None or key[0] not in coverages | {None}]
    added = [
        {"url": COVERAGE_INFO_URL, "extension": _parts(assertion, today, assertion_id)} for assertion in unique.values()
    ]
    # A shallow copy is enough: nothing inside the client's resource is changed, only a new extension list is
    # attached (the request's own dict stays as the client sent it, for the card and the audit log).
    updated = {**target, "extension": [*kept, *added]}
    first = next(iter(unique.values()))
    return ActionOutcome(
        "update", reference, assertion_id, {"type": "update", "description": first.description, "resource": updated}
    )


def coverage_action(verdict: Verdict, coverage_reference: str, today: date) -> ActionOutcome | None:
    """The CRD coverage-information systemAction for a flagged order, or None when it already carries it."""
    if not verdict.order.id:
        return None
    # The client's own draft (echo), not the tolerant reader's fixed copy: only coverage information may change.
    return coverage_update(
        verdict.order.echo, verdict.order.reference, [policy_assertion(verdict, coverage_reference)], today
    )
