"""A hook call end to end outside the web layer: the engine judges, the adapter reads the Coverage, then it answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from .engine import HookRequest, Outcome, Service, assess, respond
from .fhir.client import CoverageFinder
from .ops import tracing


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
    with tracing.span(tracing.ENGINE_SPAN):
        assessment = assess(request, service)
    found = None
    if assessment.flagged and coverage is not None:
        # Each read from the FHIR server is a span of its own (fhir/client.py), a sibling of the engine's.
        coverage.require(request, service.prefetch)
        if assessment.wants_coverage:
            found = coverage.resolve(request, service.prefetch)
    with tracing.span(tracing.RESPOND_SPAN):
        return respond(assessment, found, today or date.today(), new_uuid)
