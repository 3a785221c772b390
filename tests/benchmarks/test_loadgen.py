"""The load generators `make bench` drives the service with (wrk, h2load), against a real
`stepnet serve` of the committed model: what they report and the failures they count. gRPC
answers HTTP 200 even when a call fails, so a load that fails must still show its errors."""

import pytest

from benchmarks import loadgen
from benchmarks.service import Server, digits_version, load_upload

pytestmark = pytest.mark.skipif(bool(loadgen.available()), reason="wrk and h2load: .ci/run installs them")
MODEL = "stepnet-digits"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    version = digits_version(tmp_path_factory.mktemp("repo"))      # a copy of the committed model
    server = Server(version.parent.parent, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def test_rest_loads_count_requests_cpu_and_client_errors(server):
    _, body, kind = load_upload("digits")
    good = loadgen.measured(server, lambda: loadgen.wrk(server.url + "/predict", body, {"Content-Type": kind}, 2, 1))
    assert good["requests"] >= 10 and good["throughput"] > 0 and good["errors"] == good["errors_5xx"] == 0
    assert 0 < good["p50_ms"] <= good["p99_ms"]
    assert {"event-loop", "preprocess"} <= set(good["cpu_ms_per_request"])
    bad = loadgen.measured(server, lambda: loadgen.wrk(server.url + "/predict", b"not an image",
                                                       {"Content-Type": "image/png"}, 2, 1))
    assert bad["errors"] >= bad["requests"] >= 10 and bad["errors_5xx"] == 0     # 4xx: the client's mistake
    path, payload, headers = loadgen.v2_binary_request(MODEL, body)
    v2 = loadgen.measured(server, lambda: loadgen.wrk(server.url + path, payload, headers, 2, 1))
    assert v2["requests"] >= 10 and v2["errors"] == 0


def test_grpc_loads_count_failures_that_http_status_hides(server):
    _, body, _ = load_upload("digits")
    good = loadgen.measured(server, lambda: loadgen.h2load_grpc(
        server.grpc_target, loadgen.grpc_request(MODEL, body), 4, 1))
    assert good["requests"] >= 10 and good["errors"] == 0 and good["mean_ms"] > 0
    bad = loadgen.measured(server, lambda: loadgen.h2load_grpc(
        server.grpc_target, loadgen.grpc_request("no-such-model", body), 4, 1))
    assert bad["errors"] >= bad["requests"] >= 10 and bad["errors_5xx"] == 0
