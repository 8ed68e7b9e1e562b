"""OpenTelemetry traces of hook calls (optional extra `otel`): off unless the standard OTEL_* variables ask for them."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ..audit import CallRecord

log = logging.getLogger(__name__)

INSTRUMENTATION = "cds_service"
DEFAULT_SERVICE_NAME = "cds-service"
EXPORTERS = ("otlp", "console")
_TRUE = {"1", "true", "yes", "on"}

# Span names (docs/operators-tooling.md lists them with their attributes).
CALL_ROUTE = "/cds-services/{service_id}"
CALL_SPAN = f"POST {CALL_ROUTE}"
PARSE_SPAN = "cds.parse"
ENGINE_SPAN = "cds.engine"
RESPOND_SPAN = "cds.respond"
FHIR_READ_SPAN = "cds.fhir.read"
AUDIT_SPAN = "cds.audit.record"


class _NoSpan:
    """What every span helper returns while tracing is off: one shared object, no allocation, no work."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


NO_SPAN = _NoSpan()

# The process's tracer while tracing is on; None (the default) makes every helper below return NO_SPAN.
_tracer: Any = None
_provider: TracerProvider | None = None
_propagator: Any = None


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables turn tracing on (the one switch, documented in docs/operators-tooling.md).

    Off when OTEL_SDK_DISABLED is true or OTEL_TRACES_EXPORTER is "none". On when OTEL_TRACES_EXPORTER names an
    exporter (otlp, console), or, with OTEL_TRACES_EXPORTER unset, when an OTLP endpoint is set
    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT). Nothing set: off.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def setup(environ: Mapping[str, str] | None = None) -> bool:
    """At start-up: turn tracing on when the OTEL_* variables ask for it (else leave it as it is). ConfigError when
    they ask for something this service cannot do (the extra not installed, another exporter or protocol)."""
    env = os.environ if environ is None else environ
    if not wanted(env):
        return False
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    unknown = [e for e in exporters if e not in EXPORTERS]
    if unknown:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: this service exports with otlp or console, not {unknown[0]!r}")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    )
    if "otlp" in exporters and protocol.strip().lower() != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: this service sends OTLP as http/protobuf, not {protocol!r}")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as exc:
        raise ConfigError(
            f"tracing is turned on by OTEL_* variables but needs the extra 'otel': pip install 'cds-service[otel]' "
            f"({exc})"
        ) from None
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; give a name only when they do not.
    resource = Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER (default parentbased_always_on)
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Headers, timeout, compression: OTEL_EXPORTER_OTLP_[TRACES_]* as the exporter documents; the endpoint
            # from the same variables, read here from `environ` (the ones that turned tracing on).
            exporter = OTLPSpanExporter(endpoint=_traces_endpoint(env))
        else:
            exporter = ConsoleSpanExporter()
        # Batched in a thread of its own (OTEL_BSP_* settings): a call never waits for the collector.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    log.info("tracing on: OpenTelemetry spans exported with %s", ", ".join(exporters))
    return True


def _traces_endpoint(env: Mapping[str, str]) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as given, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces (the OTLP/HTTP
    rule); None: the exporter's default, http://localhost:4318/v1/traces."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return f"{base.rstrip('/')}/v1/traces" if base else None


def use(provider: TracerProvider | None) -> None:
    """Make `provider` the process's tracer provider (tests give one with an in-memory exporter); None: off."""
    global _tracer, _provider, _propagator
    if provider is None:
        _tracer = _provider = _propagator = None
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION)
    # W3C trace context only (traceparent, tracestate): never baggage, whose contents the EHR chose, to a FHIR server.
    _propagator = TraceContextTextMapPropagator()


def stop() -> None:
    """Send what is batched, stop the exporter's thread and turn tracing off (benchmarks, tests)."""
    provider = _provider
    use(None)
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_ms: int = 5000) -> None:
    """Send the spans still batched (a worker exiting)."""
    provider = _provider
    if provider is not None:
        try:
            provider.force_flush(timeout_ms)
        except Exception:
            log.warning("tracing: flushing spans failed", exc_info=True)


# -- spans ----------------------------------------------------------------------------------------------------------


def span(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one (parsing, the engine, the answer, the audit record)."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    span_cm: AbstractContextManager[Any] = tracer.start_as_current_span(name)
    return span_cm


class _CallSpan:
    """The span of one hook call, parented by the EHR's traceparent when it sent one; its attributes come from the
    call's audit record when the call ends, whatever way it ends (answered, refused, failed)."""

    def __init__(self, record: CallRecord, headers: Any) -> None:
        from opentelemetry.trace import SpanKind

        self.record = record
        parent = _propagator.extract(headers)
        # The exception that ends a refused call (a 400) is the answer, not a fault: the status says which.
        self._cm: AbstractContextManager[Any] = _tracer.start_as_current_span(
            CALL_SPAN,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "http.route": CALL_ROUTE,
                "cds.service.id": record.service_id,
                "cds.hook": record.hook or "",
            },
            record_exception=False,
            set_status_on_exception=False,
        )
        self.span: Any = None

    def __enter__(self) -> Any:
        self.span = self._cm.__enter__()
        return self.span

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        from opentelemetry.trace import Status, StatusCode

        record, span = self.record, self.span
        try:
            # No patient data: ids the EHR chose for the call, counts, the status; never the patient, user or orders.
            if record.hook_instance:
                span.set_attribute("cds.hook_instance", record.hook_instance)
            span.set_attribute("http.response.status_code", record.status)
            span.set_attribute("cds.orders.judged", len(record.orders))
            span.set_attribute("cds.orders.flagged", sum(1 for o in record.orders if o.flagged))
            span.set_attribute("cds.cards", len(record.cards))
            if record.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", str(record.status))
        except Exception:  # a span must never break the call it describes
            log.warning("tracing: setting the call's attributes failed", exc_info=True)
        self._cm.__exit__(kind, value, traceback)


def call_span(record: CallRecord, headers: Any) -> AbstractContextManager[Any]:
    """The span of a hook call; `headers` (the request's, any mapping with .get) may carry the EHR's traceparent."""
    if _tracer is None:
        return NO_SPAN
    return _CallSpan(record, headers)


def fhir_read_span(base: str, query: str) -> AbstractContextManager[Any]:
    """A read from the client's FHIR server: where (scheme, host, port) and what type, never the query's values
    (the patient's id is in them)."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    from opentelemetry.trace import SpanKind

    parts = urlsplit(base)
    resource_type = query.split("?", 1)[0].strip("/").split("/", 1)[0]
    span_cm: AbstractContextManager[Any] = tracer.start_as_current_span(
        FHIR_READ_SPAN,
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "GET",
            "url.scheme": parts.scheme,
            "server.address": parts.hostname or "",
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
            "fhir.resource_type": resource_type[:64],
        },
        record_exception=False,
    )
    return span_cm


def trace_headers() -> dict[str, str]:
    """The W3C traceparent (and tracestate) of the current span, for an outgoing request; {} while off."""
    propagator = _propagator
    if propagator is None:
        return {}
    headers: dict[str, str] = {}
    propagator.inject(headers)
    return headers
