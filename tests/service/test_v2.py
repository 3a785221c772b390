"""The Open Inference Protocol through the official client (tritonclient[http]) against the shared
server: health, metadata, inference with FP32 and BYTES inputs as JSON and as binary data, the
outputs asked for, and the same numbers as POST /predict. Then, on a server of its own: v2
requests join the batches of /predict requests and meet the same back-pressure and limits."""

import base64
import json
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.repository.model_json import Preprocessing
from service.inference.preprocess import Preprocessor

pytestmark = pytest.mark.timeout(120)

MODEL = "stepnet-digits"
OUTPUTS = ("logits", "probabilities", "step_size", "nsi", "stiffness_score", "unusual")


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def meta(default_model) -> dict:
    return json.loads((default_model / "model.json").read_text())


@pytest.fixture(scope="module")
def pngs(digits, encode) -> list[bytes]:
    return [encode(image) for image in digits[0][:4]]


def image_input(pngs: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(pngs)], "BYTES")
    # JSON strings cannot hold image bytes: in JSON, BYTES elements are base64
    values = pngs if binary else [base64.b64encode(png) for png in pngs]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def fp32_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def infer(client, tensor, outputs=OUTPUTS, binary=True, **kwargs) -> dict[str, np.ndarray]:
    requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    result = client.infer(MODEL, [tensor], outputs=requested, **kwargs)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def test_health_and_server_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, "1")
    assert not triton_client.is_model_ready("no-such-model")
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "stepnet" and metadata["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


def test_model_metadata(triton_client, meta):
    c, h, w = meta["input"]["shape"]
    k, n_layers = len(meta["classes"]), len(meta["layers"])
    for version in ("", "1"):
        metadata = triton_client.get_model_metadata(MODEL, version)
        assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
                                      {"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert metadata["outputs"] == [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "step_size", "datatype": "FP32", "shape": [-1, n_layers, 3]},
            {"name": "nsi", "datatype": "FP32", "shape": [-1, n_layers]},
            {"name": "stiffness_score", "datatype": "FP32", "shape": [-1]},
            {"name": "unusual", "datatype": "BOOL", "shape": [-1]}]
    with pytest.raises(InferenceServerException) as error:
        triton_client.get_model_metadata("no-such-model")
    assert error.value.status() == "404"


def test_bytes_and_fp32_inputs_as_json_and_binary_equal_predict(triton_client, client, pngs, meta):
    expected = [client.post("/predict", params={"top_k": 10}, files={"file": ("d.png", png)}).json()
                for png in pngs]
    preprocess = Preprocessor(Preprocessing.model_validate(meta["preprocessing"]), 10**8)
    x = np.stack([preprocess(png) for png in pngs])                          # (4, C, H, W)
    results = {(kind, binary): infer(triton_client, make(binary), binary=binary)
               for kind, make in (("image", lambda b: image_input(pngs, b)), ("input", lambda b: fp32_input(x, b)))
               for binary in (True, False)}
    undefined = [not row["nsi_defined"] for row in meta["layers"]]
    for outputs in results.values():
        assert {name: a.shape for name, a in outputs.items()} == {
            "logits": (4, 10), "probabilities": (4, 10), "step_size": (4, len(undefined), 3), "nsi": (4, len(undefined)),
            "stiffness_score": (4,), "unusual": (4,)}
        assert all(a.dtype == (bool if name == "unusual" else np.float32) for name, a in outputs.items())
        for i, body in enumerate(expected):
            probabilities = np.zeros(10)
            for p in body["predictions"]:
                probabilities[p["index"]] = p["probability"]
            np.testing.assert_allclose(outputs["probabilities"][i], probabilities, rtol=1e-4, atol=1e-6)
            step = [[layer["step_size"][k] for k in ("mean", "min", "max")] for layer in body["layers"]]
            np.testing.assert_allclose(outputs["step_size"][i], step, rtol=1e-4, atol=1e-6)
            nsi = [np.nan if layer["nsi"] is None else layer["nsi"] for layer in body["layers"]]
            np.testing.assert_allclose(outputs["nsi"][i], nsi, rtol=1e-4)   # NaN where NSI is undefined
            assert list(np.isnan(outputs["nsi"][i])) == undefined
            z = outputs["logits"][i].astype(np.float64)
            np.testing.assert_allclose(np.exp(z - z.max()) / np.exp(z - z.max()).sum(), probabilities, rtol=1e-4, atol=1e-6)
            score = body["stiffness_score"]
            assert outputs["stiffness_score"][i] == pytest.approx(score["value"], rel=1e-4)
            assert outputs["unusual"][i] == score["unusual"]
    # JSON and binary carry the same float32 numbers
    for kind in ("image", "input"):
        for name in OUTPUTS:
            np.testing.assert_array_equal(results[(kind, True)][name], results[(kind, False)][name])


def test_only_the_outputs_asked_for_come_back(triton_client, pngs):
    outputs = infer(triton_client, image_input(pngs[:2], True), outputs=("nsi", "probabilities"), request_id="r-7")
    assert list(outputs) == ["nsi", "probabilities"]
    result = triton_client.infer(MODEL, [image_input(pngs[:1], True)],
                                 outputs=[triton.InferRequestedOutput("logits", binary_data=False),
                                          triton.InferRequestedOutput("step_size", binary_data=True)],
                                 request_id="r-8", model_version="1")
    response = result.get_response()
    assert response["id"] == "r-8" and response["model_version"] == "1"
    assert [(o["name"], "data" in o, "binary_data_size" in o.get("parameters", {})) for o in response["outputs"]] \
        == [("logits", True, False), ("step_size", False, True)]
    assert result.as_numpy("nsi") is None
    # no outputs named: all of them (tritonclient then asks for binary data)
    everything = triton_client.infer(MODEL, [image_input(pngs[:1], True)])
    assert [o["name"] for o in everything.get_response()["outputs"]] == list(OUTPUTS)


def test_plain_json_without_the_client(server, pngs):
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(pngs[0]).decode()]}], "outputs": [{"name": "nsi"}]}
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert output["name"] == "nsi" and output["datatype"] == "FP32" and None in output["data"]   # null: NaN


def test_v2_requests_join_predict_batches_and_share_its_limits(start_server, single_model_repository, digit_png,
                                                                metric):
    # a batch of 2 waits up to 4 s to fill; 2 requests may be admitted; 2 s per request
    server = start_server(single_model_repository, max_batch_size=2, max_queue_delay_ms=4000, max_queue_size=2,
                          request_timeout_s=2, max_upload_bytes=64 * 1024)
    infer_url = f"{server.url}/v2/models/{MODEL}/infer"
    labels = {"model": MODEL, "version": "1"}
    predicted = []
    waiting = threading.Thread(target=lambda: predicted.append(
        httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}, timeout=30)))
    waiting.start()
    deadline = time.monotonic() + 10
    while metric(server.url, "stepnet_queue_depth", **labels) < 1:
        assert time.monotonic() < deadline, "/predict never reached the queue"
        time.sleep(0.02)

    two = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                       "data": [base64.b64encode(digit_png).decode()] * 2}]}
    refused = httpx.post(infer_url, json=two, timeout=30)             # 2 rows, 1 free slot: refused at once
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert isinstance(refused.json()["error"], str)
    too_large = httpx.post(infer_url, content=b"{" + b" " * (64 * 1024) + b"}", timeout=30)
    assert too_large.status_code == 413 and isinstance(too_large.json()["error"], str)

    started = time.monotonic()
    one = dict(two, inputs=[dict(two["inputs"][0], shape=[1], data=two["inputs"][0]["data"][:1])])
    joined = httpx.post(infer_url, json=one, timeout=30)              # fills the batch /predict waits in
    assert joined.status_code == 200, joined.text
    assert time.monotonic() - started < 1.5
    waiting.join(30)
    assert predicted[0].status_code == 200
    assert metric(server.url, "stepnet_batch_size_count", **labels) == 1
    assert metric(server.url, "stepnet_batch_size_sum", **labels) == 2

    alone = httpx.post(infer_url, json=one, timeout=30)               # nobody fills its batch: 504
    assert alone.status_code == 504 and isinstance(alone.json()["error"], str)
    assert metric(server.url, "stepnet_queue_depth", **labels) == 0
    assert "Traceback" not in server.log()
