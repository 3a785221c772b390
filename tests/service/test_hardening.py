"""What an adversarial client found (issue 11), each against a real `stepnet serve`: non-finite
inputs, versions in Unicode digits, JSON nested thousands deep, clients that leave mid-upload,
requests with more rows than the queue admits, paths in public messages, a 404 naming a broken
version, slow uploads, compressed and mistyped bodies, lenient booleans and versions, /docs
without internet, and admin keys that can be guessed."""

import hashlib
import json
import math
import re
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(90)

MODEL = "stepnet-digits"
INFER = f"/v2/models/{MODEL}/infer"
KEY = "hardening-admin-key-0123"
ADMIN = {"Authorization": f"Bearer {KEY}"}
QUEUE = 4


def fp32(values: np.ndarray | list, shape=(1, 1, 32, 32)) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": values}]}


def v2_error(response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "request_id"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def rest_error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


# ---------------------------------------------------------------- the shared server

@pytest.mark.parametrize("values", [
    [math.nan] + [0.0] * 1023,
    [None] + [0.0] * 1023,
    [1e308] + [0.0] * 1023,
    [-math.inf] + [0.0] * 1023,
], ids=["NaN", "null", "1e308", "-Infinity"])
def test_non_finite_json_inputs_get_400(client, values):
    body = json.dumps(fp32(values), allow_nan=True)
    message = v2_error(client.post(INFER, content=body, headers={"Content-Type": "application/json"}))
    assert "not finite" in message


def test_non_finite_binary_inputs_get_400(client):
    values = np.zeros((1, 1, 32, 32), "<f4")
    values[0, 0, 5, 5] = np.nan
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": values.nbytes}}]}).encode()
    response = client.post(INFER, content=header + values.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert "not finite" in v2_error(response)


def test_outputs_that_overflow_do_not_blank_the_live_statistics(client, metric, server, digit_png):
    """Finite inputs at float32's edge overflow inside the network (NaN outputs, answered as null):
    the live step-size statistics leave those rows out and stay numbers."""
    assert client.post("/predict", files={"file": ("d.png", digit_png)}).status_code == 200
    huge = np.full((1, 1, 32, 32), 3e38, np.float32).ravel().tolist()
    response = client.post(INFER, json=fp32(huge))
    assert response.status_code == 200
    assert any(None in output["data"] for output in response.json()["outputs"])     # it did overflow
    stiffness = client.get("/stiffness", params={"model": MODEL}).json()
    assert all(layer["live"]["step_size_mean"] is not None for layer in stiffness["layers"])
    assert math.isfinite(metric(server.url, "stepnet_layer_step_size_mean", model=MODEL, layer="stage1.block1"))


@pytest.mark.parametrize("version", ["%E2%91%A0", "%C2%B2", "%EF%BC%91", "1.0", "01", "1_0", "+1", "%201"],
                         ids=["circled 1", "superscript 2", "fullwidth 1", "1.0", "01", "1_0", "+1", "space 1"])
def test_versions_other_than_ascii_digits_get_4xx(client, version):
    for path in (f"/v2/models/{MODEL}/versions/{version}", f"/v2/models/{MODEL}/versions/{version}/ready",
                 f"/v2/models/{MODEL}/versions/{version}/infer"):
        response = client.post(path, json=fp32([0.0] * 1024)) if path.endswith("/infer") else client.get(path)
        assert "is not a version" in v2_error(response), path
    response = client.get(f"/stiffness?model={MODEL}&version={version}")
    assert "is not a version" in rest_error(response, 422, "invalid_parameter")


@pytest.mark.parametrize("path", ["/v2/repository/index", INFER])
def test_json_nested_thousands_deep_gets_400(client, path):
    body = "[" * 3000 + "]" * 3000
    message = v2_error(client.post(path, content=body, headers={"Content-Type": "application/json"}))
    assert "recursion limit" in message


def test_index_takes_only_a_json_boolean(client):
    assert "ready" in v2_error(client.post("/v2/repository/index", json={"ready": "yes"}))
    assert client.post("/v2/repository/index", json={"ready": True}).status_code == 200


def test_v2_refuses_bodies_that_are_not_json(client):
    body = json.dumps(fp32([0.0] * 1024))
    assert "Content-Type" in v2_error(client.post(INFER, content=body, headers={"Content-Type": "text/plain"}))
    assert client.post(INFER, content=body).status_code == 200            # tritonclient sends none
    assert client.post(INFER, content=body, headers={"Content-Type": "application/json"}).status_code == 200


def test_compressed_uploads_get_415(client, digit_png):
    import gzip

    response = client.post("/predict", content=gzip.compress(digit_png),
                           headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
    assert "Content-Encoding gzip" in rest_error(response, 415, "unsupported_media_type")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_need_no_internet(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert not re.search(r"https?://", page.text), "the page loads something from the internet"
    links = _Links()
    links.feed(page.text)
    assert len(links.urls) >= 3
    for url in links.urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 500, url
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code == 404


def test_the_schema_documents_limits_and_errors(client, server):
    spec = client.get("/openapi.json").json()
    window = next(p for p in spec["paths"]["/stiffness"]["get"]["parameters"] if p["name"] == "window")
    assert window["schema"]["minimum"] == 1 and window["schema"]["maximum"] == 10_000
    version = next(p for p in spec["paths"]["/predict"]["post"]["parameters"] if p["name"] == "version")
    assert "pattern" in json.dumps(version["schema"])
    ready_400 = json.dumps(spec["paths"]["/v2/models/{model_name}/versions/{model_version}/ready"]["get"]
                           ["responses"]["400"])
    assert "ModelReady" in ready_400 and "ProtocolErrorResponse" in ready_400
    allow = client.options("/v2/repository/index").headers["allow"]
    assert set(allow.replace(" ", "").split(",")) >= {"GET", "POST"}


# ---------------------------------------------------------------- a server with a broken version

@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory, default_model, publish_version):
    """Version 1 as exported; version 2's model.onnx is not ONNX, with the size and sha256 that
    model.json gives, so it gets as far as onnxruntime's parser."""
    root = tmp_path_factory.mktemp("broken")
    publish_version(default_model, root, MODEL, 1)

    def garble(folder):
        garbage = b"this is not an onnx graph" * 40
        (folder / "model.onnx").write_bytes(garbage)
        meta = json.loads((folder / "model.json").read_text())
        meta["files"]["model.onnx"] = {"sha256": hashlib.sha256(garbage).hexdigest(), "bytes": len(garbage)}
        (folder / "model.json").write_text(json.dumps(meta))

    publish_version(default_model, root, MODEL, 2, alter=garble)
    return root


@pytest.fixture(scope="module")
def hardened(start_server, broken_repository):
    return start_server(broken_repository, cli=True, admin_key=KEY, max_queue_size=QUEUE,
                        request_timeout_s=2)


def test_a_queue_smaller_than_a_batch_is_warned_about(hardened):
    assert re.search(r"WARNING .*STEPNET_MAX_QUEUE_SIZE=4 is below STEPNET_MAX_BATCH_SIZE=8", hardened.log())


def test_more_rows_than_the_queue_admits_get_400_not_503(hardened):
    rows = QUEUE + 1
    response = httpx.post(hardened.url + f"/v2/models/{MODEL}/versions/1/infer",
                          json=fp32([0.0] * 1024 * rows, (rows, 1, 32, 32)), timeout=30)
    message = v2_error(response)
    assert "STEPNET_MAX_QUEUE_SIZE" in message and "Retry-After" not in response.headers
    ok = httpx.post(hardened.url + f"/v2/models/{MODEL}/versions/1/infer",
                    json=fp32([0.0] * 1024 * QUEUE, (QUEUE, 1, 32, 32)), timeout=30)
    assert ok.status_code == 200


def test_public_messages_name_versions_and_not_paths(hardened, broken_repository):
    entries = {e["version"]: e for e in httpx.get(hardened.url + "/v2/repository/index", timeout=10).json()}
    reason = entries["2"]["reason"]
    assert entries["2"]["state"] == "UNAVAILABLE" and "stepnet-digits:2" in reason
    response = httpx.post(hardened.url + "/predict?version=2", files={"file": ("d.png", b"x")}, timeout=10)
    message = rest_error(response, 404, "version_not_found")
    for text in (reason, message):
        assert str(broken_repository) not in text and "/tmp" not in text
        assert "INVALID_PROTOBUF" not in text and "protobuf" not in text.lower()
    assert str(broken_repository) in hardened.log() and "INVALID_PROTOBUF" in hardened.log()


def test_slow_uploads_get_408(hardened):
    with socket.create_connection(("127.0.0.1", hardened.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\x89PNG" * 10)
        started = time.monotonic()
        answer = sock.recv(4096)
        answered = time.monotonic() - started
        while chunk := sock.recv(4096):      # the head and the body may come in separate segments
            answer += chunk                  # (connection: close ends the stream)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer, answer
    assert 1.5 < answered < 6


def test_clients_that_leave_mid_upload_are_499_not_500(hardened, metric, digit_png):
    def count(status: str) -> float:
        try:
            return metric(hardened.url, "stepnet_requests_total", endpoint="/predict", status=status)
        except KeyError:
            return 0.0

    errors_before, tracebacks_before = count("500"), hardened.log().count("Traceback")
    gone_before = count("499")
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", hardened.port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 5000\r\n\r\n" + digit_png[:40])
    deadline = time.monotonic() + 10
    while count("499") < gone_before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count("499") == gone_before + 10
    assert count("500") == errors_before
    assert hardened.log().count("Traceback") == tracebacks_before
    assert len(re.findall(r"disconnected before sending the whole request", hardened.log())) >= 10


def test_unload_refuses_versions_in_unicode_digits(hardened):
    url = f"{hardened.url}/v2/repository/models/{MODEL}/unload"
    for version in ("①", "１", "1.0", True, 1.0, [1]):
        response = httpx.post(url, json={"parameters": {"version": version}}, headers=ADMIN, timeout=10)
        assert "parameters.version" in v2_error(response), version
    assert httpx.get(hardened.url + f"/v2/models/{MODEL}/versions/1/ready", timeout=10).status_code == 200


def test_once_only_a_broken_version_is_left_the_model_is_404_model_not_found(hardened, broken_repository,
                                                                             digit_png):
    """The last one in this module: it unloads version 1."""
    response = httpx.post(f"{hardened.url}/v2/repository/models/{MODEL}/unload",
                          json={"parameters": {"version": "1"}}, headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    message = rest_error(httpx.post(hardened.url + "/predict", files={"file": ("d.png", digit_png)},
                                    timeout=10), 404, "model_not_found")
    assert "no version serving" in message and str(broken_repository) not in message


# ---------------------------------------------------------------- start-up

@pytest.mark.parametrize("key", ["   ", "short", " padded-admin-key-123 "], ids=["blank", "short", "padded"])
def test_guessable_admin_keys_are_refused_at_start(single_model_repository, key):
    result = subprocess.run([sys.executable, "-m", "stepnet.cli", "serve"], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "STEPNET_ADMIN_KEY": key,
                                             "STEPNET_MODEL_REPOSITORY": str(single_model_repository)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "STEPNET_ADMIN_KEY" in result.stderr and "16" in result.stderr


def test_the_stiffness_tracker_leaves_non_finite_rows_out(default_model):
    from service.repository.model_json import read_metadata
    from service.inference.live_stiffness import StiffnessTracker

    meta = read_metadata(default_model)
    tracker = StiffnessTracker(meta, 100)
    n_layers = len(meta.layers)
    good = np.full((3, n_layers, 3), 0.5, np.float32)
    tracker.record(good, np.full((3, n_layers), 2.0, np.float32))
    tracker.record(np.full((1, n_layers, 3), np.nan, np.float32), np.full((1, n_layers), np.nan, np.float32))
    layer = tracker.summary().layers[0]
    assert layer.live.count == 4 and layer.live.step_size_mean == pytest.approx(0.5)
