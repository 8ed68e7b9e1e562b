"""One hook call, in two pure steps: judge the orders, then (with what the adapter gathered) build the answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

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
    if flagged and config.coverage_info and coverage is not None and coverage.coverage_reference:
        for verdict in flagged:
            action = crd.coverage_action(verdict, coverage.coverage_reference, today)
            if action is not None:
                outcome.system_actions.append(action)
            elif verdict.order.id:
                outcome.notes.append(f"{verdict.order.reference}: already carries this coverage assertion")
    return outcome
