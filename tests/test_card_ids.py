"""Feedback is linked to the service's own cards however soon it arrives, on every worker and every instance."""

from __future__ import annotations

import json
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cds_service.store.card_ids import is_marked, mint
from cds_service.store.report import build_report

from . import builders as b
from .conftest import SELECT, SIGN
from .process_support import running_server
from .store_support import store_for

WHEN = "2026-11-02T10:15:00Z"


def test_a_marked_uuid_is_a_version_4_uuid_recognised_only_under_its_key_and_service() -> None:
    key = b"k" * 32
    ids = [mint(key, SIGN) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:50]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value
        assert is_marked(key, SIGN, value) and is_marked(key, SIGN, value.upper())
        assert not is_marked(b"other key", SIGN, value)
        assert not is_marked(key, SELECT, value)  # a card of the other service is not this one's
    assert not any(is_marked(key, SIGN, str(uuid.uuid4())) for _ in range(2000))
    assert not is_marked(key, SIGN, "not-a-uuid") and not is_marked(key, SIGN, "")


def post(base: str, path: str, body: Any) -> Any:
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=20) as response:  # a new connection each time: any worker
        assert response.status == 200
        return json.loads(response.read())


def card_then_feedback(base: str, feedback_base: str, n: int) -> tuple[str, Any]:
    """Show a card, then at once send the clinician's override of it (to the same or another server)."""
    order = b.service_request(f"d{n}", text="Digital motion x-ray of the cervical spine")
    [card] = post(base, f"/cds-services/{SIGN}", b.hook_request("order-sign", [order]))["cards"]
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": WHEN}
    return card["uuid"], post(feedback_base, f"/cds-services/{SIGN}/feedback", {"feedback": [item]})


@pytest.mark.slow
def test_feedback_is_linked_on_every_worker_and_instance_before_any_card_is_written(
    tmp_path: Path, db_url: str
) -> None:
    """Audit off: no card ever reaches the audit log, so only the uuid's mark can link the feedback.

    Two instances of `cds-service serve --workers 2` share one database (and so the key made once in it); each card
    shown by one is fed back, at once, to either, on a fresh connection that the kernel hands to either worker.
    """
    env = {"CDS_DATABASE_URL": db_url, "CDS_AUDIT": "false"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_server(tmp_path / "a", "--workers", "2", env=env) as (_, first, _log_a),
        running_server(tmp_path / "b", "--workers", "2", env=env) as (_, second, _log_b),
    ):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda n: card_then_feedback(first, second if n % 2 else first, n), range(40)))
        for _card, answer in results:
            assert answer == {"stored": 1, "duplicates": 0, "unknownCards": []}
        stranger = str(uuid.uuid4())
        answer = post(
            second,
            f"/cds-services/{SIGN}/feedback",
            {"feedback": [{"card": stranger, "outcome": "overridden", "outcomeTimestamp": WHEN}]},
        )
        assert answer["unknownCards"] == [stranger]
    store = store_for(db_url)
    try:
        with store.db.engine.connect() as conn:
            known: dict[str, bool] = dict(conn.exec_driver_sql("SELECT card_uuid, card_known FROM feedback").all())
    finally:
        store.close()
    assert all(known[card] for card, _ in results) and not known[stranger]


@pytest.mark.slow
def test_the_report_counts_feedback_sent_at_once_as_linked(tmp_path: Path, db_url: str) -> None:
    with running_server(tmp_path, "--workers", "2", env={"CDS_DATABASE_URL": db_url}) as (process, base, _):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda n: card_then_feedback(base, base, n), range(20)))
        assert all(answer["unknownCards"] == [] for _, answer in results)
        process.terminate()  # a graceful stop writes every answered call's record
        assert process.wait(timeout=30) == 0
    store = store_for(db_url)
    try:
        feedback = build_report(store.db).to_json()["feedback"]
    finally:
        store.close()
    assert feedback["items"] == 20 and feedback["itemsForUnknownCards"] == 0 and feedback["overridden"] == 20
