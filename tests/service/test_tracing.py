"""OpenTelemetry traces (issue 16), end to end: a real `stepnet serve` exports with the SDK's
OTLP/HTTP exporter to a small collector in this test (a loopback HTTP server that decodes the
protocol's ExportTraceServiceRequest); the spans' parents, links and attributes are checked."""

import http.server
import threading
import time

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(http.server.ThreadingHTTPServer):
    def __init__(self):
        self.spans: list = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait(self, predicate, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in list(self.spans) if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no such span among {[s.name for s in self.spans]}")


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture(scope="module")
def traced(start_server, single_model_repository):
    collector = Collector()
    server = start_server(single_model_repository, cli=True, access_log="false", max_queue_delay_ms=50,
                          OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_port}",
                          OTEL_BSP_SCHEDULE_DELAY="100")
    yield server, collector
    collector.shutdown()


def test_request_queue_preprocess_and_batch_spans(traced, digit_png):
    server, collector = traced
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    response = httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)},
                          headers={"traceparent": traceparent, "X-Request-ID": "traced-1"}, timeout=30)
    assert response.status_code == 200
    trace_id = bytes.fromhex(TRACE_ID)
    (request,) = collector.wait(lambda s: s.trace_id == trace_id and s.name == "POST /predict")
    assert request.parent_span_id == bytes.fromhex(PARENT_ID)          # the client's traceparent
    assert attributes(request)["http.response.status_code"] == 200
    assert attributes(request)["stepnet.model"] == "stepnet-digits" and attributes(request)["stepnet.version"] == 1
    assert attributes(request)["stepnet.request_id"] == "traced-1"
    (queue,) = collector.wait(lambda s: s.trace_id == trace_id and s.name == "queue")
    (preprocess,) = collector.wait(lambda s: s.trace_id == trace_id and s.name == "preprocess")
    assert queue.parent_span_id == request.span_id and preprocess.parent_span_id == request.span_id
    (batch,) = collector.wait(lambda s: s.name == "inference" and any(link.span_id == request.span_id for link in s.links))
    assert batch.trace_id != trace_id                                   # one batch serves many traces
    assert [(link.trace_id, link.span_id) for link in queue.links] == [(batch.trace_id, batch.span_id)]
    batch_attributes = attributes(batch)
    assert batch_attributes["stepnet.model"] == "stepnet-digits" and batch_attributes["stepnet.batch_size"] >= 1
    assert "stepnet.instance" in batch_attributes


def test_grpc_calls_are_traced_too(traced):
    server, collector = traced
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with grpc.insecure_channel(server.grpc_target) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            pb.ServerLiveRequest(), metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),), timeout=10)
    (span,) = collector.wait(lambda s: s.trace_id == bytes.fromhex(trace_id) and s.name == "ServerLive")
    assert span.parent_span_id == bytes.fromhex("b7ad6b7169203331")
    assert attributes(span)["http.response.status_code"] == 200
