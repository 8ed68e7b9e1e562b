"""OpenTelemetry traces: the spans of a hook call, the EHR's traceparent honoured and passed on to the FHIR server,
no patient data on spans, off by default; in-process with an in-memory exporter and from the real `cds-service
serve` to a real OTLP/HTTP receiver."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cds_service import create_app
from cds_service.config import ConfigError
from cds_service.ops import tracing
from cds_service.runtime import services_of
from cds_service.store.models import audit_call

from . import builders as b
from .conftest import SIGN
from .fhir_server import FhirBehaviour, coverage, fhir_server
from .otlp_receiver import otlp_receiver
from .process_support import running_server
from .store_support import table_rows

TOKEN = "fhir-token-for-tracing-SECRET-77"
PATIENT = "pat-trace-4711"
USER = "Practitioner/prac-trace-99"
EHR_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
EHR_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{EHR_TRACE}-{EHR_SPAN}-01"
CHILDREN = {
    tracing.PARSE_SPAN,
    tracing.ENGINE_SPAN,
    tracing.FHIR_READ_SPAN,
    tracing.RESPOND_SPAN,
    tracing.AUDIT_SPAN,
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    try:
        yield memory
    finally:
        tracing.use(None)
        provider.shutdown()


def make_app(tmp_path: Path) -> Flask:
    return create_app(
        {"AUTH": "off", "ALLOW_HTTP_FHIR": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'trace.sqlite3'}"}
    )


def flagged_without_coverage(fhir_base: str) -> dict[str, Any]:
    """A flagged order-sign call whose Coverage is not prefetched: the service reads it from `fhir_base`."""
    order = b.service_request(
        "sr-trace", text="Digital motion x-ray of the lumbar spine", body_site=("122496007", "Lumbar spine")
    )
    auth = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "x", "subject": "y"}
    body = b.hook_request("order-sign", [order], fhirServer=fhir_base, fhirAuthorization=auth)
    body["context"]["patientId"] = PATIENT
    body["context"]["userId"] = USER
    return body


def hex_ids(span: ReadableSpan) -> tuple[str, str, str]:
    """(trace id, span id, parent span id or "") as 32/16 hex digits."""
    context = span.get_span_context()
    assert context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


def sampled(traceparent: str) -> str:
    """version-trace-parent of a traceparent whose flags say sampled (bit 0; bit 1 may say the id is random)."""
    head, _, flags = traceparent.rpartition("-")
    assert int(flags, 16) & 1, traceparent
    return head


def assert_no_patient_data(attributes: list[dict[str, Any]]) -> None:
    text = json.dumps(attributes, default=str)
    for secret in (PATIENT, USER, TOKEN, "prac-trace-99", "sr-trace"):
        assert secret not in text


def test_a_call_is_one_server_span_parented_by_the_ehr_with_a_child_per_step(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    behaviour = FhirBehaviour(coverages=[coverage("cov-1", PATIENT)])
    with fhir_server(behaviour) as (fhir_base, behaviour):
        body = flagged_without_coverage(fhir_base)
        response = (
            make_app(tmp_path)
            .test_client()
            .post(f"/cds-services/{SIGN}", json=body, headers={"traceparent": TRACEPARENT})
        )
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    [call] = [s for s in spans if s.name == tracing.CALL_SPAN]
    trace_id, call_id, parent = hex_ids(call)
    # The EHR's trace goes on: same trace id, the EHR's span as the parent.
    assert (trace_id, parent) == (EHR_TRACE, EHR_SPAN)
    assert call.kind == SpanKind.SERVER
    attributes = dict(call.attributes or {})
    assert attributes["cds.service.id"] == SIGN
    assert attributes["cds.hook"] == "order-sign"
    assert attributes["cds.hook_instance"] == body["hookInstance"]
    assert attributes["http.response.status_code"] == 200
    assert (attributes["cds.orders.judged"], attributes["cds.orders.flagged"], attributes["cds.cards"]) == (1, 1, 1)

    children = {s.name: s for s in spans if s is not call}
    assert set(children) == CHILDREN
    for child in children.values():
        assert hex_ids(child)[0] == EHR_TRACE and hex_ids(child)[2] == call_id, child.name
    read = children[tracing.FHIR_READ_SPAN]
    assert read.kind == SpanKind.CLIENT
    read_attributes = dict(read.attributes or {})
    assert read_attributes["fhir.resource_type"] == "Coverage"
    assert read_attributes["cds.fhir.outcome"] == "ok" and read_attributes["cds.fhir.resources"] == 1
    assert read_attributes["server.address"] == "127.0.0.1"
    # The FHIR server saw the read's span as the parent: the trace crosses into it.
    [seen] = behaviour.requests
    assert sampled(seen["traceparent"]) == f"00-{EHR_TRACE}-{hex_ids(read)[1]}"
    # In order: parse, engine, the read, the answer, the audit record.
    ordered = sorted(children.values(), key=lambda s: s.start_time or 0)
    assert [s.name for s in ordered] == [
        tracing.PARSE_SPAN,
        tracing.ENGINE_SPAN,
        tracing.FHIR_READ_SPAN,
        tracing.RESPOND_SPAN,
        tracing.AUDIT_SPAN,
    ]
    assert_no_patient_data([dict(s.attributes or {}) for s in spans] + [{"name": s.name} for s in spans])


def test_without_a_traceparent_the_call_starts_a_trace_and_a_failed_read_is_marked(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    with fhir_server(FhirBehaviour(status=503)) as (fhir_base, behaviour):
        response = (
            make_app(tmp_path).test_client().post(f"/cds-services/{SIGN}", json=flagged_without_coverage(fhir_base))
        )
    assert response.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    call = spans[tracing.CALL_SPAN]
    assert call.parent is None
    read = spans[tracing.FHIR_READ_SPAN]
    assert dict(read.attributes or {})["cds.fhir.outcome"] == "error"
    assert dict(read.attributes or {})["cds.fhir.reason"] == "FHIR server answered 503"
    assert sampled(behaviour.requests[0]["traceparent"]) == f"00-{hex_ids(call)[0]}-{hex_ids(read)[1]}"


def test_a_refused_call_is_traced_with_its_status_and_hook_instance(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    body = b.hook_request("order-sign", [b.service_request("x", text="CBC")])
    del body["context"]
    response = make_app(tmp_path).test_client().post(f"/cds-services/{SIGN}", json=body)
    assert response.status_code == 400
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {tracing.CALL_SPAN, tracing.PARSE_SPAN, tracing.AUDIT_SPAN}
    attributes = dict(spans[tracing.CALL_SPAN].attributes or {})
    assert attributes["http.response.status_code"] == 400
    assert attributes["cds.hook_instance"] == body["hookInstance"]
    assert attributes["cds.orders.judged"] == 0
    # A refusal is the answer, not a fault of the service.
    assert spans[tracing.CALL_SPAN].status.status_code == StatusCode.UNSET


def test_off_by_default_no_span_and_no_traceparent_to_the_fhir_server(tmp_path: Path) -> None:
    assert not tracing.enabled()
    app = make_app(tmp_path)
    assert not tracing.enabled()
    with fhir_server(FhirBehaviour(coverages=[coverage("cov-1", PATIENT)])) as (fhir_base, behaviour):
        response = app.test_client().post(
            f"/cds-services/{SIGN}", json=flagged_without_coverage(fhir_base), headers={"traceparent": TRACEPARENT}
        )
    assert response.status_code == 200
    [seen] = behaviour.requests
    assert seen["traceparent"] is None
    assert tracing.span(tracing.ENGINE_SPAN) is tracing.NO_SPAN


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "cds"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_the_otel_variables_that_turn_tracing_on(environ: dict[str, str], on: bool) -> None:
    assert tracing.wanted(environ) is on


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "otlp or console, not 'zipkin'"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http/protobuf, not 'grpc'",
        ),
    ],
)
def test_what_the_service_cannot_do_stops_start_up(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tracing.setup(environ)
    assert not tracing.enabled()


def test_the_otel_variables_turn_it_on_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with otlp_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "cds-under-test")
        try:
            app = make_app(tmp_path)
            assert tracing.enabled()
            body = b.hook_request("order-sign", [b.service_request("x", text="CBC")])
            assert app.test_client().post(f"/cds-services/{SIGN}", json=body).status_code == 200
            tracing.flush()
        finally:
            tracing.use(None)
        spans = received.wait_for(lambda spans: any(s.name == tracing.CALL_SPAN for s in spans))
    assert {s.resource["service.name"] for s in spans} == {"cds-under-test"}


# -- the real server ------------------------------------------------------------------------------------------------


def post(base: str, path: str, body: Any, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.slow
def test_the_real_server_sends_the_call_s_spans_to_an_otlp_receiver(tmp_path: Path) -> None:
    with (
        otlp_receiver() as (endpoint, received),
        fhir_server(FhirBehaviour(coverages=[coverage("cov-1", PATIENT)])) as (fhir_base, behaviour),
    ):
        env = {
            "CDS_ALLOW_HTTP_FHIR": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: the receiver sees the spans soon
        }
        with running_server(tmp_path, "--workers", "2", env=env) as (process, base, log):
            body = flagged_without_coverage(fhir_base)
            assert post(base, f"/cds-services/{SIGN}", body, {"traceparent": TRACEPARENT}) == 200
            spans = received.wait_for(lambda got: {s.name for s in got if s.trace_id == EHR_TRACE} >= CHILDREN)
            # A refused call: traced too, with the body's hookInstance.
            bad = b.hook_request("order-sign", [b.service_request("x", text="CBC")])
            del bad["context"]
            assert post(base, f"/cds-services/{SIGN}", bad, {}) == 400
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        # The worker's last spans were sent before it stopped.
        refused = [s for s in received.spans if s.name == tracing.CALL_SPAN and s.trace_id != EHR_TRACE]
    ours = {s.name: s for s in spans if s.trace_id == EHR_TRACE}
    call = ours[tracing.CALL_SPAN]
    assert call.parent_span_id == EHR_SPAN
    assert call.attributes["cds.hook_instance"] == body["hookInstance"]
    assert call.attributes["cds.orders.flagged"] == 1
    assert call.resource["service.name"] == "cds-service"
    for name in CHILDREN:
        assert ours[name].parent_span_id == call.span_id, name
    [seen] = behaviour.requests
    assert sampled(seen["traceparent"]) == f"00-{EHR_TRACE}-{ours[tracing.FHIR_READ_SPAN].span_id}"
    assert received.content_types[0] == "application/x-protobuf"
    [refused_call] = refused
    assert refused_call.attributes["http.response.status_code"] == 400
    assert refused_call.attributes["cds.hook_instance"] == bad["hookInstance"]
    assert_no_patient_data([s.attributes for s in received.spans])
    assert TOKEN not in log.read_text()
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None  # nothing leaked into this process


@pytest.mark.parametrize(
    ("hook_instance", "kept"),
    [
        ("d5b2e0a4-0c0e-4b1e-9a57-3f1c6c1d2e10", True),
        ("not-a-uuid-but-readable", True),
        ("x" * 201, False),
        ("line\nbreak", False),
        (42, False),
        ("", False),
    ],
)
def test_a_refused_call_names_only_a_readable_hook_instance(
    tmp_path: Path, exporter: InMemorySpanExporter, hook_instance: Any, kept: bool
) -> None:
    body = b.hook_request("order-sign", [b.service_request("x", text="CBC")]) | {"hookInstance": hook_instance}
    del body["context"]
    app = make_app(tmp_path)
    assert app.test_client().post(f"/cds-services/{SIGN}", json=body).status_code == 400
    [call] = [s for s in exporter.get_finished_spans() if s.name == tracing.CALL_SPAN]
    assert dict(call.attributes or {}).get("cds.hook_instance") == (hook_instance if kept else None)
    store = services_of(app).store
    assert store.writer.flush(10)
    [row] = table_rows(f"sqlite:///{tmp_path / 'trace.sqlite3'}", audit_call)
    assert row.hook_instance == (hook_instance if kept else None)
