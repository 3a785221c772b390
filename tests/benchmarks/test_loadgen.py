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


# Loads that succeed, on every transport, are tests/benchmarks/test_bench.py's quick run.

def test_rest_loads_count_the_clients_mistakes_apart_from_server_errors(server):
    bad = loadgen.measured(server, lambda: loadgen.wrk(server.url + "/predict", b"not an image",
                                                       {"Content-Type": "image/png"}, 2, 1))
    assert bad["errors"] >= bad["requests"] >= 10 and bad["errors_5xx"] == 0     # 4xx: the client's mistake
    assert 0 < bad["p50_ms"] <= bad["p99_ms"] and "event-loop" in bad["cpu_ms_per_request"]


def test_grpc_loads_count_failures_that_http_status_hides(server):
    _, body, _ = load_upload("digits")
    bad = loadgen.measured(server, lambda: loadgen.h2load_grpc(
        server.grpc_target, loadgen.grpc_request("no-such-model", body), 4, 1))
    assert bad["errors"] >= bad["requests"] >= 10 and bad["errors_5xx"] == 0
