"""OpenTelemetry traces (issue 16, part 3): the SDK and its OTLP/HTTP exporter, configured by the
standard OTEL_* variables; no exporter of our own.

On when STEPNET_TRACING=otlp, or with the default `auto` when OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (and OTEL_SDK_DISABLED is not true); off otherwise, and
then nothing is traced: FastAPI's telemetry sees no provider, and the batcher's and the gRPC
server's spans are skipped by one flag test.

REST request spans are FastAPI's own (its native OpenTelemetry support: the server span, the
client's traceparent, the route and status); the service adds the model, version and request ID
to them (service.api.deps.leased, service.telemetry.logs) and makes the spans below.

Spans, in the trace of the client's W3C `traceparent` where it sends one:
- the request (server span: REST `METHOD /route` by FastAPI, gRPC the RPC's name), with its
  status code, model, version and request ID;
- `preprocess` (the decode and pre-processing of its images), a child of the request;
- `queue` (from enqueue to the start of its batch), a child of the request, linked to the batch;
- `inference` (session.run of one batch, in its own trace: one batch serves many requests), with
  a link to every request it served and the batch size, model, version and instance.

On shutdown the spans left are exported for at most FLUSH_TIMEOUT_S. The SDK alone would wait up
to 30 s (its processor's bound), and an unreachable collector takes the exporter's whole timeout
per batch (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s), spent in retries with backoff.
"""

import logging
import os
import threading
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
TRACER = trace.get_tracer("stepnet")
FLUSH_TIMEOUT_S = 3.0       # the last export on shutdown: beside STEPNET_SHUTDOWN_TIMEOUT_S in the grace period
_sdk: "tuple[TracerProvider, SpanExporter] | None" = None     # set when tracing is on


def enabled() -> bool:
    return _sdk is not None


def wanted(mode: str) -> bool:
    if mode != "auto":
        return mode == "otlp"
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(mode: str) -> bool:
    """Installs the SDK's tracer provider with a batching OTLP exporter, when wanted."""
    global _sdk
    if _sdk is not None or not wanted(mode):
        return _sdk is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                        "stepnet")}))
    exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _sdk = provider, exporter
    return True


def shutdown() -> None:
    """Flush what is left (at the end of the app's lifespan), for at most FLUSH_TIMEOUT_S; then
    the exporter is shut down, which ends its retries, and what it had not sent is dropped."""
    if _sdk is None:
        return
    provider, exporter = _sdk
    flushing = threading.Thread(target=provider.shutdown, name="otel-flush", daemon=True)
    flushing.start()
    flushing.join(FLUSH_TIMEOUT_S)
    if flushing.is_alive():
        exporter.shutdown()
        log.warning("the OTLP collector took longer than %.0f s: the spans not yet exported are dropped",
                    FLUSH_TIMEOUT_S)


def server_span(name: str, carrier: dict[str, str]):
    """The request's span, in the trace of the carrier's traceparent where there is one."""
    return TRACER.start_as_current_span(name, context=propagate.extract(carrier), kind=SpanKind.SERVER)


def finish_request(span, status: int, request_id: str | None, model: tuple[str, int] | None) -> None:
    span.set_attribute("http.response.status_code", status)
    if request_id is not None:
        span.set_attribute("stepnet.request_id", request_id)
    if model is not None:
        span.set_attribute("stepnet.model", model[0])
        span.set_attribute("stepnet.version", model[1])
    if status >= 500:
        span.set_status(StatusCode.ERROR)


def batch_spans(items, model: str, version: int, instance: str, device: str, dispatched_ns: int):
    """The batch's `inference` span, linked to each request, and each request's `queue` span,
    linked to the batch. Returns the inference span (to end after the run) or None when off."""
    if _sdk is None:
        return None
    links = [Link(trace.get_current_span(item.trace_context).get_span_context()) for item in items]
    batch = TRACER.start_span("inference", context=otel_context.Context(), links=links, attributes={
        "stepnet.model": model, "stepnet.version": version, "stepnet.batch_size": len(items),
        "stepnet.instance": instance, "stepnet.device": device})
    for item in items:
        queue = TRACER.start_span("queue", context=item.trace_context, start_time=item.enqueued_ns,
                                  links=[Link(batch.get_span_context())],
                                  attributes={"stepnet.batch_size": len(items)})
        queue.end(end_time=dispatched_ns)
    return batch


def fail(span, exc: Exception) -> None:
    """End a span whose work raised."""
    span.record_exception(exc)
    span.set_status(StatusCode.ERROR, type(exc).__name__)
    span.end()
