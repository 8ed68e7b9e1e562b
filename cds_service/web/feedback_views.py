"""HTTP endpoints of the store: CDS Hooks feedback, and readiness (503 while the database is unreachable)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app

from ..errors import ServiceError, operation_outcome
from ..ops import metrics
from ..runtime import services_of
from ..store import SchemaTooNew, Store, StoreUnavailable
from .feedback import parse_feedback
from .views import authenticate, json_response, read_json, runtime

log = logging.getLogger(__name__)
bp = Blueprint("cds_feedback", __name__)


def store() -> Store:
    return services_of(current_app).store


@bp.post("/cds-services/<service_id>/feedback")
def post_feedback(service_id: str) -> Response:
    """CDS Hooks 2.0 feedback: checked, stored (once per distinct item) before the 200."""
    rt = runtime()
    if service_id not in rt.policies.services:
        raise ServiceError(404, f"No CDS service with id '{service_id[:64]}'; see GET /cds-services.")
    # The JWT's aud is this endpoint's own URL (CDS Hooks: aud is the URL of the endpoint called).
    identity = authenticate(rt, f"/cds-services/{service_id}/feedback")
    items = parse_feedback(read_json())
    try:
        result = store().save_feedback(service_id, items, identity)
    except (StoreUnavailable, SchemaTooNew) as exc:
        log.error("feedback for %s not stored (%d items): %s", service_id, len(items), exc)
        # 503 rather than 200: the client keeps the feedback and may send it again; nothing was stored.
        raise ServiceError(503, "Feedback could not be stored right now; send it again later.") from None
    known_reasons = frozenset(
        reason.code for policy in rt.policies.services[service_id].policies for reason in policy.card.override_reasons
    )
    for item in result.stored_items:
        metrics.feedback_stored(item.outcome, item.override_code, known_reasons)
    if result.unknown_cards:
        log.info("feedback for %d unknown card uuids on %s stored and flagged", len(result.unknown_cards), service_id)
    return json_response(
        {"stored": result.stored, "duplicates": result.duplicates, "unknownCards": result.unknown_cards}
    )


@bp.get("/ready")
def ready() -> Response:
    """Readiness: 200 while the database answers, 503 while it does not (liveness stays on /health)."""
    ok, body = store().readiness()
    if ok:
        return json_response({"status": "ready", **body})
    problem = body["store"].get("error") or body["store"]["status"]
    outcome = operation_outcome(f"The store is unavailable: {problem}", code="transient")
    return json_response(outcome, 503)
