"""One hook call, in two pure steps: judge the orders, then (with what the adapter gathered) build the answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from . import crd
from .cards import CardMaker
from .decision import Verdict, judge
from .orders import read_order
from .outcome import Outcome
from .policy.model import Service
from .request import HookRequest


@dataclass
class Assessment:
    """The verdicts of one call, before any data the answer may need (the Coverage) has been gathered."""

    request: HookRequest
    service: Service
    verdicts: list[Verdict]
    config: crd.Configuration

    @property
    def flagged(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.flagged]

    @property
    def wants_coverage(self) -> bool:
        """Whether the answer would use the patient's Coverage (a CRD coverage-information systemAction)."""
        return bool(self.flagged) and self.config.coverage_info


def assess(request: HookRequest, service: Service) -> Assessment:
    """Judge every order the hook asks about against every policy of the service."""
    verdicts: list[Verdict] = []
    for draft in request.orders:
        order = read_order(draft.readable, draft.resource)  # parsed once, judged by every policy
        verdicts.extend(judge(order, policy) for policy in service.policies)
    return Assessment(request, service, verdicts, crd.read_configuration(request.extension))


def respond(
    assessment: Assessment,
    coverage: crd.CoverageResult | None,
    today: date,
    new_uuid: Callable[[], str] | None = None,
) -> Outcome:
    """The cards for each flagged order (as configured) and, when the Coverage is known, the CRD systemActions.

    One card per flagged order by default: the Propose Alternate Request card when a covered alternative can be
    proposed, else the External Reference card; the Instructions card too when the EHR asks for it. `new_uuid`
    makes the cards' uuids (the adapter's, so feedback can be recognised as about this service's cards).
    """
    outcome = Outcome(assessment.verdicts)
    config = assessment.config
    flagged = assessment.flagged
    maker = CardMaker(assessment.request, today, config.crd_version, new_uuid)
    for verdict in flagged:
        text = verdict.policy.card
        card = maker.alternative_card(verdict) if config.card_enabled(text.alternative_topic.code) else None
        if card is None and config.card_enabled(text.guideline_topic.code):
            card = maker.guideline_card(verdict)
        if card is not None:
            outcome.cards.append(card)
        if config.card_enabled(crd.INSTRUCTIONS):
            instructions = maker.instructions_card(verdict)
            if instructions is not None:
                outcome.cards.append(instructions)
    if config.max_cards is not None:
        outcome.cards = outcome.cards[: config.max_cards]
    if coverage is not None:
        outcome.notes.extend(coverage.notes)
    if config.coverage_info:
        _coverage_actions(assessment, coverage, today, outcome)
    return outcome


def _assertion(verdict: Verdict, coverage: crd.CoverageResult | None, version: str) -> crd.Assertion | None:
    """The answer for one flagged order: the policy's under the patient's Coverage; with CRD 2.2 (asked for in
    davinci-crd.requestedVersion) an honest coverage answer when no single active Coverage could be read
    (resp-43/44/45); with CRD 2.0 nothing then, as CRD 2.0.1 has no code for it."""
    if coverage is None:
        return None
    if version != "2.0" and coverage.problem:
        description = f"{crd.REASON_DISPLAY[coverage.problem]}: coverage for this order could not be determined"
        return crd.problem_assertion(coverage.problem, coverage.detail, coverage.named, verdict, description)
    if coverage.coverage_reference:
        return crd.policy_assertion(verdict, coverage.coverage_reference)
    return None


def _coverage_actions(
    assessment: Assessment, coverage: crd.CoverageResult | None, today: date, outcome: Outcome
) -> None:
    """One coverage-information systemAction per in-scope resource (CRD 2.2.1 resp-29), none for a resource that
    already carries what it would say (resp-35), and a `technical` answer for an order that could not be read."""
    version = assessment.config.crd_version
    targets: dict[str, tuple[dict[str, Any], list[crd.Assertion]]] = {}
    for verdict in assessment.flagged:
        reference = verdict.order.reference
        assertion = _assertion(verdict, coverage, version) if reference else None
        if reference and assertion is not None:
            targets.setdefault(reference, (verdict.order.echo, []))[1].append(assertion)
    scope = assessment.request.scope
    if scope is not None and scope.unread and version != "2.0":
        named = coverage.coverage_reference if coverage is not None and not coverage.problem else None
        detail = f"The order could not be read from the EHR's FHIR server: {scope.failure}."
        for reference in scope.unread:
            # Only its reference is known: the update names the order and adds the answer (the kit's
            # coverage_information_extension_only_payload), it cannot echo content it never saw.
            kind, rid = reference.split("/", 1)
            assertion = crd.problem_assertion(crd.TECHNICAL, detail, named, None, "Coverage could not be determined")
            targets.setdefault(reference, ({"resourceType": kind, "id": rid}, []))[1].append(assertion)
    for reference, (resource, assertions) in targets.items():
        action = crd.coverage_update(resource, reference, assertions, today)
        if action is not None:
            outcome.system_actions.append(action)
        else:
            outcome.notes.append(f"{reference}: already carries this coverage assertion")
