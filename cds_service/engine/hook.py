"""One hook call, in two pure steps: judge the orders, then (with what the adapter gathered) build the answer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from . import crd
from .cards import build_card
from .decision import Verdict, judge_resource
from .outcome import Outcome
from .policy.model import Service
from .prefilter import order_words
from .request import HookRequest, resources_to_judge


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
    for resource in resources_to_judge(request):
        words = order_words(resource) if len(service.policies) > 1 else None  # one pass for every policy
        verdicts.extend(judge_resource(resource, policy, words) for policy in service.policies)
    return Assessment(request, service, verdicts, crd.read_configuration(request.extension))


def respond(assessment: Assessment, coverage: crd.CoverageResult | None, today: date) -> Outcome:
    """One card per flagged order (as configured) and, when the Coverage is known, the CRD systemActions."""
    outcome = Outcome(assessment.verdicts)
    config = assessment.config
    flagged = assessment.flagged
    for verdict in flagged:
        if config.card_enabled(verdict.policy.card.topic.code):
            outcome.cards.append(build_card(verdict, assessment.request))
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
