"""Triton's model configuration and statistics extensions (issue 29), read by tritonclient over
REST and gRPC from a real `stepnet serve` (the shared `server`)."""

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

MODEL = "stepnet-digits"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http(server):
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


@pytest.fixture(scope="module")
def rpc(server):
    with triton_grpc.InferenceServerClient(server.grpc_target) as c:
        yield c


def images(module, encoded: list[bytes]):
    tensor = module.InferInput("image", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=object))
    return tensor


def version_stats(stats: dict) -> dict:
    (entry,) = [s for s in stats["model_stats"] if s["name"] == MODEL and s["version"] == "1"]
    return entry


def test_extensions_advertised(http, rpc):
    for metadata in (http.get_server_metadata(), rpc.get_server_metadata(as_json=True)):
        assert {"model_configuration", "statistics"} <= set(metadata["extensions"])


def test_model_config_over_both_transports(http, rpc):
    rest = http.get_model_config(MODEL)
    assert rest == http.get_model_config(MODEL, "1")
    assert rest["max_batch_size"] >= 1 and rest["platform"] == "onnxruntime_onnx"
    inputs = {t["name"]: t for t in rest["input"]}
    assert inputs["input"]["data_type"] == "TYPE_FP32" and len(inputs["input"]["dims"]) == 3
    assert inputs["image"]["data_type"] == "TYPE_STRING"
    assert all(t["optional"] for t in inputs.values())
    assert set(rest["parameters"]["input_alternatives"]["string_value"].split(",")) == set(inputs)
    outputs = {t["name"]: t for t in rest["output"]}
    assert set(outputs) == {"logits", "probabilities", "step_size", "nsi", "stiffness_score", "unusual"}
    assert outputs["unusual"]["data_type"] == "TYPE_BOOL" and outputs["unusual"]["reshape"] == {"shape": []}
    assert outputs["step_size"]["dims"][1] == 3 and outputs["logits"]["dims"] == outputs["probabilities"]["dims"]
    assert rest["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
    assert rest["instance_group"][0]["kind"] == "KIND_CPU" and rest["instance_group"][0]["count"] >= 1

    config = rpc.get_model_config(MODEL, as_json=True)["config"]       # protobuf JSON: int64 as strings
    assert config["max_batch_size"] == rest["max_batch_size"]
    assert [(t["name"], t["data_type"], [int(d) for d in t.get("dims", [])]) for t in config["input"]] == \
        [(t["name"], t["data_type"], t["dims"]) for t in rest["input"]]
    assert [t["name"] for t in config["output"]] == [t["name"] for t in rest["output"]]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert int(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"]) == 256


def test_statistics_count_both_transports(http, rpc, digit_png):
    before = version_stats(http.get_inference_statistics(MODEL))
    rest_requests, grpc_requests = 3, 2
    for _ in range(rest_requests):
        http.infer(MODEL, [images(triton_http, [digit_png, digit_png])])
    for _ in range(grpc_requests):
        rpc.infer(MODEL, [images(triton_grpc, [digit_png])])

    after = version_stats(http.get_inference_statistics(MODEL, "1"))
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - old["success"]["count"] == rest_requests + grpc_requests
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[key]["count"] - old[key]["count"] == rest_requests + grpc_requests
        assert stats[key]["ns"] > old[key]["ns"]
    assert stats["fail"] == old["fail"]
    rows = after["inference_count"] - before["inference_count"]
    assert rows >= 2 * rest_requests + grpc_requests       # /predict's rows would count too
    assert 1 <= after["execution_count"] - before["execution_count"] <= rows
    assert after["execution_count"] <= after["inference_count"]
    assert after["last_inference"] > 0

    over_grpc = rpc.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    (entry,) = [s for s in over_grpc if s["version"] == "1"]
    assert int(entry["inference_stats"]["success"]["count"]) >= stats["success"]["count"]
    assert int(entry["execution_count"]) >= after["execution_count"]
    every_model = {s["name"] for s in http.get_inference_statistics()["model_stats"]}
    assert MODEL in every_model and every_model == \
        {s["name"] for s in rpc.get_inference_statistics(as_json=True)["model_stats"]}


def test_refused_request_is_not_a_success(http, rpc):
    before = version_stats(http.get_inference_statistics(MODEL))["inference_stats"]
    bad = triton_http.InferInput("input", [1, 3, 2, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        http.infer(MODEL, [bad])
    assert caught.value.status() == "400"
    bad_grpc = triton_grpc.InferInput("input", [1, 3, 2, 2], "FP32")
    bad_grpc.set_data_from_numpy(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        rpc.infer(MODEL, [bad_grpc])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    after = version_stats(http.get_inference_statistics(MODEL))["inference_stats"]
    assert after["success"]["count"] == before["success"]["count"]


def test_unknown_model(http, rpc):
    for call in (lambda: http.get_model_config("no-such-model"),
                 lambda: http.get_inference_statistics("no-such-model"),
                 lambda: http.get_model_config(MODEL, "9")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "404"
    for call in (lambda: rpc.get_model_config("no-such-model"),
                 lambda: rpc.get_inference_statistics("no-such-model")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == str(grpc.StatusCode.NOT_FOUND)
