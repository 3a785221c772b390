"""Request IDs and structured logs (issue 16, part 3), against real `stepnet serve` processes."""

import json
import re
import time
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ADMIN_KEY = "observability-admin-key-42"
pytestmark = pytest.mark.timeout(120)


def test_the_clients_request_id_comes_back(client, digit_png):
    response = client.post("/predict", files={"file": ("d.png", digit_png)}, headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "abc-123"
    error = client.post("/predict?model=nope", files={"file": ("d.png", digit_png)},
                        headers={"X-Request-ID": "req.42"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "req.42"
    assert error.json()["error"]["request_id"] == "req.42"
    v2 = client.get("/v2/models/nope", headers={"X-Request-ID": "v2-err"})
    assert v2.status_code == 404 and v2.json() == {"error": v2.json()["error"], "request_id": "v2-err"}


def test_a_request_id_is_made_when_absent_or_unusable(client):
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert client.get("/healthz").headers["x-request-id"] != generated
    for bad in ("x" * 129, "has space", "ünïcode"):
        got = client.get("/healthz", headers={"X-Request-ID": bad.encode("utf-8")}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", got), bad


def test_grpc_echoes_the_request_id(server):
    request = pb.ModelReadyRequest(name="nope")
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelReady(request, metadata=(("x-request-id", "grpc-7"),), timeout=10)
        _, call = stub.ServerLive.with_call(pb.ServerLiveRequest(), timeout=10)
    assert dict(caught.value.trailing_metadata())["x-request-id"] == "grpc-7"
    assert re.fullmatch(r"[0-9a-f]{32}", dict(call.trailing_metadata())["x-request-id"])


def test_json_logs_parse_and_carry_the_request(start_server, single_model_repository, digit_png):
    server = start_server(single_model_repository, cli=True, log_format="json", admin_key=ADMIN_KEY)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post("/predict", files={"file": ("d.png", digit_png)}, headers={"X-Request-ID": "json-1"})
        c.get("/v2/models/nope", headers={"X-Request-ID": "json-2"})
        c.post("/v2/repository/models/stepnet-digits/load", headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                                      "X-Request-ID": "json-3"})
        c.post("/v2/repository/models/stepnet-digits/load", headers={"Authorization": "Bearer wrong-wrong-wrong-1"})
    time.sleep(0.5)
    server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]                # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    access = {e.get("request_id"): e for e in entries if e["logger"] == "stepnet.access"}
    predict = access["json-1"]
    assert predict["endpoint"] == "/predict" and predict["status"] == 200 and predict["duration_ms"] > 0
    assert predict["model"] == "stepnet-digits" and predict["version"] == 1 and predict["protocol"] == "rest"
    assert access["json-2"]["status"] == 404 and access["json-3"]["status"] == 200
    assert not any(ADMIN_KEY in line for line in lines)


def test_the_favicon_is_no_404_and_unmatched_paths_are_logged_as_asked(client, server):
    favicon = client.get("/favicon.ico")
    assert favicon.status_code == 204 and "max-age" in favicon.headers["cache-control"]
    assert client.get("/no-such-page-42", headers={"X-Request-ID": "lost-1"}).status_code == 404
    deadline = time.monotonic() + 5
    while "/no-such-page-42" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log().splitlines() if "lost-1" in line and "404" in line)
    assert "GET /no-such-page-42 404" in line


def test_the_servers_threads_are_named_for_the_operating_system(server, client, digit_png):
    """top -H, py-spy and /proc tell the threads apart, so the CPU splits by what each does."""
    assert client.post("/predict", files={"file": ("d.png", digit_png)}).status_code == 200
    names = {path.read_text().strip() for path in Path(f"/proc/{server.proc.pid}/task").glob("*/comm")}
    assert {"event-loop", "preprocess_0", "onnxruntime"} <= names, names
    assert any(name.startswith("infer-") for name in names), names
