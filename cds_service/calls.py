"""A hook call end to end outside the web layer: the engine judges, the adapter reads the Coverage, then it answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from .engine import HookRequest, Outcome, Service, assess, respond
from .engine.referenced import ENCOUNTER_START, complete
from .fhir.coverage import CoverageFinder
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
    scope = request.scope
    if scope is not None and not scope.done:
        # order-dispatch, appointment-book: the orders the prefetch lacked, read from the client's FHIR server.
        read, failure = coverage.read_orders(request, scope.missing) if coverage else ({}, "no FHIR reader")
        complete(request, read, failure)
    if request.hook == ENCOUNTER_START:
        # CRD ops-1: no cards; the patient's Coverage is kept for the encounter's later hooks.
        outcome = Outcome([])
        if coverage is not None:
            outcome.notes.append(coverage.warm(request, service.prefetch))
        return outcome
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
