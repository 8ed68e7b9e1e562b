"""Reading the client's FHIR server: CDS_FHIR_TIMEOUT is a wall-clock deadline whatever the server does, reads in
flight are bounded, and a circuit breaker per server stops reading from one that keeps failing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service import create_app
from cds_service.fhir.breaker import CLOSED, HALF_OPEN, OPEN, BreakerBoard, BreakerSettings, server_key
from cds_service.fhir.client import FetchError, FhirReader, FhirSettings
from cds_service.runtime import services_of
from cds_service.store.models import audit_call

from . import builders as b
from .conftest import SIGN
from .fhir_server import FhirBehaviour, coverage, fhir_server, make_certificate, silent_server
from .store_support import table_rows, wait_for

CERVICAL = ("122494005", "Cervical spine")
TOKEN = "fhir-bearer-token-5d2c-SECRET"
TIMEOUT = 1.0
# A drip-fed answer long enough to take far longer than the deadline: 300 bytes at one every 0.3 s is 90 s.
DRIP = {"drip": 0.3, "padding": 300}


def make_app(tmp_path: Path, **settings: Any) -> Flask:
    config = {
        "AUTH": "off",
        "ALLOW_HTTP_FHIR": True,
        "FHIR_TIMEOUT": TIMEOUT,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'reads.sqlite3'}",
    }
    return create_app(config | settings)


def sign(app: Flask, base: str) -> tuple[float, dict[str, Any]]:
    """One order-sign call with a flagged order and no prefetched Coverage: (seconds, answer)."""
    order = b.service_request("dsv1", cpt="76496", text="Unlisted fluoroscopic procedure", body_site=CERVICAL)
    auth = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "x", "subject": "y"}
    body = b.hook_request("order-sign", [order], fhirServer=base, fhirAuthorization=auth)
    started = time.monotonic()
    response = app.test_client().post(f"/cds-services/{SIGN}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return time.monotonic() - started, response.get_json()


def audit_notes(app: Flask, tmp_path: Path) -> list[list[str]]:
    assert services_of(app).store.writer.flush(10)
    return [row.notes for row in table_rows(f"sqlite:///{tmp_path / 'reads.sqlite3'}", audit_call)]


def read_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cds-fhir-read"]


def timed_read(reader: FhirReader, base: str) -> tuple[float, list[dict[str, Any]] | FetchError]:
    started = time.monotonic()
    try:
        result: list[dict[str, Any]] | FetchError = reader.read(base, "Coverage?patient=pat-1&status=active", TOKEN)
    except FetchError as exc:
        result = exc
    return time.monotonic() - started, result


@pytest.fixture(autouse=True)
def _no_read_thread_outlives_its_test() -> Iterator[None]:
    yield
    # Every read's own thread ends by itself at its deadline (its sockets keep it), not when the server lets go.
    wait_for(lambda: not read_threads(), timeout=TIMEOUT + 1, what="the FHIR read threads to end")


# --- the deadline --------------------------------------------------------------------------------------------


def test_a_drip_fed_body_ends_at_the_deadline_with_the_card_and_no_assertion(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = make_app(tmp_path)
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], **DRIP)) as (base, seen):  # type: ignore[arg-type]
        elapsed, answer = sign(app, base)
        assert TIMEOUT <= elapsed < TIMEOUT + 0.5
        assert len(answer["cards"]) == 1 and answer["systemActions"] == []
        # The read's thread stops at the deadline too, while the server would go on dripping for a minute.
        wait_for(lambda: not read_threads(), timeout=0.5, what="the read thread to end")
    assert len(seen.requests) == 1
    [notes] = audit_notes(app, tmp_path)
    assert notes == ["Coverage unknown: reading it from the FHIR server failed (no complete answer within 1 s)"]
    assert TOKEN not in caplog.text


def test_a_drip_fed_status_line_and_headers_end_at_the_deadline(tmp_path: Path) -> None:
    reader = FhirReader(FhirSettings(timeout=TIMEOUT, allow_http=True))
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], drip_all=True, **DRIP)) as (base, _):  # type: ignore[arg-type]
        elapsed, result = timed_read(reader, base)
        wait_for(lambda: not read_threads(), timeout=0.5, what="the read thread to end")
    assert isinstance(result, FetchError) and result.server_fault
    assert TIMEOUT <= elapsed < TIMEOUT + 0.5


def test_a_drip_fed_answer_over_tls_ends_at_the_deadline(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path)
    reader = FhirReader(FhirSettings(timeout=TIMEOUT))
    reader.session.verify = str(certificate.cert_file)  # trust the stand-in's own certificate
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], **DRIP), tls=certificate) as (base, _):  # type: ignore[arg-type]
        elapsed, result = timed_read(reader, base)
        wait_for(lambda: not read_threads(), timeout=0.5, what="the read thread to end")
    assert isinstance(result, FetchError)
    assert TIMEOUT <= elapsed < TIMEOUT + 0.5


def test_tls_reads_verify_the_certificate(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path)
    reader = FhirReader(FhirSettings(timeout=TIMEOUT))
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")]), tls=certificate) as (base, seen):
        _, refused = timed_read(reader, base)
        assert isinstance(refused, FetchError) and str(refused) == "SSLError"
        assert seen.requests == []  # nothing, the token least of all, went to a server that could not prove itself
        reader.session.verify = str(certificate.cert_file)
        _, found = timed_read(reader, base)
    assert isinstance(found, list) and [r["id"] for r in found] == ["cov-1"]
    assert seen.requests[0]["authorization"] == f"Bearer {TOKEN}"


def test_a_connection_that_accepts_and_never_answers_ends_at_the_deadline(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with fhir_server(FhirBehaviour(hang=True)) as (base, _):
        elapsed, answer = sign(app, base)
    assert TIMEOUT <= elapsed < TIMEOUT + 0.5
    assert len(answer["cards"]) == 1 and answer["systemActions"] == []


def test_a_tls_handshake_that_never_completes_ends_at_the_deadline() -> None:
    reader = FhirReader(FhirSettings(timeout=TIMEOUT))
    with silent_server() as port:
        elapsed, result = timed_read(reader, f"https://127.0.0.1:{port}/fhir")
        wait_for(lambda: not read_threads(), timeout=0.5, what="the read thread to end")
    assert isinstance(result, FetchError) and result.server_fault
    assert TIMEOUT <= elapsed < TIMEOUT + 0.5


def test_endless_next_links_end_at_the_deadline_or_after_three_pages(tmp_path: Path) -> None:
    reader = FhirReader(FhirSettings(timeout=TIMEOUT, allow_http=True))
    behaviour = FhirBehaviour(coverages=[coverage(f"c{i}", status="cancelled") for i in range(9)], page_size=1)
    behaviour.endless, behaviour.delay = True, 0.4
    with fhir_server(behaviour) as (base, seen):
        elapsed, result = timed_read(reader, base)
        assert isinstance(result, FetchError) and TIMEOUT <= elapsed < TIMEOUT + 0.5
        assert len(seen.requests) == 3  # the third page was still coming at the deadline
        behaviour.delay = 0
        seen.requests.clear()
        _, pages = timed_read(reader, base)
    assert isinstance(pages, list) and len(pages) == 3 and len(seen.requests) == 3


# --- reads in flight -----------------------------------------------------------------------------------------


def test_reads_in_flight_are_bounded_per_server_and_a_full_server_does_not_block_a_healthy_one(tmp_path: Path) -> None:
    # Four reads per process, two per server: a hanging server takes two, the rest are refused at once.
    app = make_app(tmp_path, FHIR_MAX_READS=4, FHIR_BREAKER_FAILURES=0)
    with (
        fhir_server(FhirBehaviour(hang=True)) as (hanging, stuck),
        fhir_server(FhirBehaviour(coverages=[coverage("cov-1")])) as (healthy, _),
        ThreadPoolExecutor(max_workers=5) as pool,
    ):
        slow = [pool.submit(sign, app, hanging) for _ in range(5)]
        wait_for(lambda: len(stuck.requests) == 2, timeout=TIMEOUT / 2, what="two reads in flight")
        elapsed, answer = sign(app, healthy)
        assert elapsed < TIMEOUT / 2 and len(answer["systemActions"]) == 1
        times = sorted(f.result()[0] for f in slow)
    assert len(stuck.requests) == 2
    assert all(t < TIMEOUT / 2 for t in times[:3]) and all(t >= TIMEOUT for t in times[3:])
    skipped = [n for n in audit_notes(app, tmp_path) if n and "already in flight" in n[0]]
    assert len(skipped) == 3


# --- the circuit breaker -------------------------------------------------------------------------------------


def test_the_breaker_opens_after_three_failures_probes_once_and_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = make_app(tmp_path, FHIR_BREAKER_COOLDOWN=0.5)
    client = app.test_client()
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1")], status=503)) as (base, seen):
        key = server_key(base)
        for _ in range(3):
            assert sign(app, base)[1]["systemActions"] == []
        assert len(seen.requests) == 3
        [state] = client.get("/health").get_json()["fhirServers"]
        assert state["server"] == key and state["state"] == OPEN and state["failures"] == 3
        assert state["openedAt"].endswith("Z") and state["lastError"] == "FHIR server answered 503"
        assert f"FHIR server {key}: circuit breaker open after 3 consecutive failed reads" in caplog.text
        # Open: the call answers at once with its card, without reading.
        elapsed, answer = sign(app, base)
        assert elapsed < TIMEOUT / 2 and len(answer["cards"]) == 1 and len(seen.requests) == 3
        # After the cool-down one call probes; the server has recovered, so the breaker closes.
        time.sleep(0.6)
        seen.status = 200
        _, answer = sign(app, base)
        assert len(answer["systemActions"]) == 1 and len(seen.requests) == 4
        [state] = client.get("/health").get_json()["fhirServers"]
        assert state == {"server": key, "state": CLOSED, "failures": 0}
        assert "circuit breaker half-open" in caplog.text and "circuit breaker closed" in caplog.text
    notes = audit_notes(app, tmp_path)
    assert "circuit breaker open since" in notes[3][0] and "read skipped" in notes[3][0]
    assert notes[4] == []
    assert TOKEN not in caplog.text and TOKEN not in repr(notes)


def test_a_failed_probe_opens_the_breaker_again_and_other_calls_skip_while_it_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = make_app(tmp_path, FHIR_BREAKER_COOLDOWN=0.5, FHIR_BREAKER_FAILURES=2)
    with fhir_server(FhirBehaviour(hang=True)) as (base, seen):
        for _ in range(2):
            sign(app, base)
        time.sleep(0.6)
        with ThreadPoolExecutor(max_workers=1) as pool:
            probe = pool.submit(sign, app, base)
            wait_for(lambda: len(seen.requests) == 3, timeout=TIMEOUT / 2, what="the probe's read")
            elapsed, _ = sign(app, base)  # while the probe waits on the hanging server
            assert elapsed < TIMEOUT / 2 and len(seen.requests) == 3
            assert probe.result()[0] >= TIMEOUT
    [state] = app.test_client().get("/health").get_json()["fhirServers"]
    assert state["state"] == OPEN and state["failures"] == 3
    assert "circuit breaker open again, the probe call failed (no complete answer within 1 s)" in caplog.text


def test_a_failing_server_does_not_touch_the_breaker_of_a_healthy_one(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with (
        fhir_server(FhirBehaviour(status=500)) as (failing, _),
        fhir_server(FhirBehaviour(coverages=[coverage("cov-1")])) as (healthy, _),
    ):
        for _ in range(3):
            sign(app, failing)
        assert len(sign(app, healthy)[1]["systemActions"]) == 1
    states = {s["server"]: s["state"] for s in app.test_client().get("/health").get_json()["fhirServers"]}
    assert states == {server_key(failing): OPEN, server_key(healthy): CLOSED}


def test_answers_about_the_query_do_not_count_as_server_failures(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with fhir_server(FhirBehaviour(status=404)) as (base, seen):
        for _ in range(4):
            sign(app, base)
        assert len(seen.requests) == 4  # a 404 (or 401) is an answer: the server is up
    [state] = app.test_client().get("/health").get_json()["fhirServers"]
    assert state["state"] == CLOSED and state["failures"] == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board(clock: Callable[[], float], **settings: Any) -> BreakerBoard:
    return BreakerBoard(BreakerSettings(**({"failures": 3, "cooldown": 30, "window": 60} | settings)), clock)


def test_failures_further_apart_than_the_window_do_not_add_up() -> None:
    clock = Clock()
    breakers = board(clock)
    for _ in range(2):
        breakers.admit("s").failure("x")
    clock.now += 61
    breakers.admit("s").failure("x")
    breakers.admit("s").failure("x")
    assert breakers.snapshot()[0]["state"] == CLOSED
    breakers.admit("s").failure("x")
    assert breakers.snapshot()[0]["state"] == OPEN


def test_only_one_probe_at_a_time_and_outcomes_of_older_calls_are_ignored() -> None:
    clock = Clock()
    breakers = board(clock)
    late = breakers.admit("s")  # admitted while closed, reports after the breaker opened
    for _ in range(3):
        breakers.admit("s").failure("x")
    late.success()
    assert breakers.snapshot()[0]["state"] == OPEN
    clock.now += 30
    probe = breakers.admit("s")
    assert probe.probe and breakers.snapshot()[0]["state"] == HALF_OPEN
    with pytest.raises(Exception, match="a probe call is reading now"):
        breakers.admit("s")
    probe.cancel()  # the probe made no read: the next call probes at once
    again = breakers.admit("s")
    assert again.probe
    again.success()
    assert breakers.snapshot()[0] == {"server": "s", "state": CLOSED, "failures": 0}


def test_server_key_is_scheme_host_port_and_path_without_credentials() -> None:
    assert server_key("HTTPS://user:pw@EHR.example.org/fhir/R4/") == "https://ehr.example.org:443/fhir/R4"
    assert server_key("http://127.0.0.1:8080/fhir?x=1") == "http://127.0.0.1:8080/fhir"
