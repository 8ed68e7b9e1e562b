"""A hook call end to end outside the web layer: the engine judges, the adapter reads the Coverage, then it answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from .engine import HookRequest, Outcome, Service, assess, respond
from .fhir.client import CoverageFinder


def answer(
    request: HookRequest,
    service: Service,
    coverage: CoverageFinder | None,
    today: date | None = None,
    new_uuid: Callable[[], str] | None = None,
) -> Outcome:
    """Judge the orders; only when one is flagged read what the answer needs (prefetch first, then the FHIR server).

    A policy's required prefetch that can be neither prefetched nor read is a 412 (ServiceError), raised here, never
    in the engine.
    """
    assessment = assess(request, service)
    found = None
    if assessment.flagged and coverage is not None:
        coverage.require(request, service.prefetch)
        if assessment.wants_coverage:
            found = coverage.resolve(request, service.prefetch)
    return respond(assessment, found, today or date.today(), new_uuid)
