"""A request whose input makes the runtime fail fails alone (issue 27, item 9): the batch it was
in runs again in parts on the same instance, every other request in it is answered, the failing
one gets a generic 500 (gRPC: INTERNAL) while the log keeps ONNX Runtime's text, once, and the
instance stays in rotation.

The model is the committed one with a Gather whose index is each row's largest value: a
pre-processed input with a value of 1000 (a v2 FP32 tensor) is out of its bounds, as a real
model's embedding lookup fails on a token ID past its table."""

import asyncio
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from service.core.errors import InferenceFailed
from tests.service.conftest import replace_graph

pytestmark = pytest.mark.timeout(120)
MODEL = "poisoned"
TABLE = 100                 # the Gather's table: indices -100 ... 99 are valid
REQUESTS, POISONED = 120, (7, 31, 58, 59, 90, 113)


def _add_gather(folder) -> None:
    """logits = logits + zeros[int(max(row))]: the same answers for every input in range."""
    proto = onnx.load(str(folder / "model.onnx"))
    graph = proto.graph
    (producer,) = [node for node in graph.node if "logits" in node.output]
    producer.output[list(producer.output).index("logits")] = "logits_raw"
    graph.initializer.extend([
        helper.make_tensor("gather_table", TensorProto.FLOAT, [TABLE], [0.0] * TABLE),
        helper.make_tensor("row_axes", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("column_axis", TensorProto.INT64, [1], [1])])
    graph.node.extend([
        helper.make_node("ReduceMax", ["input", "row_axes"], ["row_max"], keepdims=0),      # (B,)
        helper.make_node("Cast", ["row_max"], ["row_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["gather_table", "row_index"], ["row_zero"]),           # (B,)
        helper.make_node("Unsqueeze", ["row_zero", "column_axis"], ["column_zero"]),       # (B, 1)
        helper.make_node("Add", ["logits_raw", "column_zero"], ["logits"])])               # (B, K)
    onnx.checker.check_model(proto)
    replace_graph(folder, proto.SerializeToString())


@pytest.fixture(scope="module")
def server(start_server, publish_version, default_model, tmp_path_factory):
    repository = tmp_path_factory.mktemp("poisoned")
    publish_version(default_model, repository, MODEL, 1, alter=_add_gather)
    return start_server(repository, cli=True, instances=2, cpu_solo="false", max_queue_delay_ms=5,
                        max_batch_size=8, max_queue_size=256)


def _input(poisoned: bool, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-0.5, 2.0, (1, 1, 32, 32)).astype(np.float32)
    if poisoned:
        x[0, 0, 16, 16] = 1000.0
    return x


def _body(poisoned: bool, seed: int) -> dict:
    x = _input(poisoned, seed)
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], "outputs": [{"name": "logits"}]}


def test_only_the_poisoned_requests_fail_and_the_instances_serve_on(server):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    logged = len(server.log())
    bodies = [_body(i in POISONED, i) for i in range(REQUESTS)]
    with httpx.Client(timeout=60) as client:
        alone = client.post(url, json=bodies[0])
        assert alone.status_code == 200, alone.text
        order = list(range(REQUESTS))
        random.Random(27).shuffle(order)
        with ThreadPoolExecutor(24) as pool:            # concurrent: batches of several on both instances
            answers = dict(zip(order, pool.map(lambda i: client.post(url, json=bodies[i]), order)))
        models = client.get(server.url + "/models").json()["models"]

    innocent_failed = [i for i in range(REQUESTS) if i not in POISONED and answers[i].status_code != 200]
    assert innocent_failed == [], [answers[i].text for i in innocent_failed]
    np.testing.assert_allclose(answers[0].json()["outputs"][0]["data"], alone.json()["outputs"][0]["data"],
                               atol=1e-5)
    for i in POISONED:
        assert answers[i].status_code == 500, answers[i].text
        message = answers[i].json()["error"]
        assert message == InferenceFailed.ON_INPUT                 # no "[ONNXRuntimeError] ... Gather node"
        assert answers[i].json()["request_id"] == answers[i].headers["x-request-id"]

    (info,) = models
    assert [(i["healthy"], i["last_error"]) for i in info["instances"]] == [(True, None), (True, None)]
    log = server.log()[logged:]
    failures = [line for line in log.splitlines() if "Gather" in line]
    assert len(failures) == len(POISONED)                   # the runtime's text once per poisoned request
    assert all("ONNXRuntimeError" in line for line in failures)
    assert max(int(re.search(r"its batch had (\d+)", line)[1]) for line in failures) > 1   # not alone
    assert {answers[i].headers["x-request-id"] for i in POISONED} == {
        line.rpartition("request_id=")[2].split()[0].rstrip("]") for line in failures}
    assert "out of rotation" not in log and "Traceback" not in log


def test_over_grpc_too_only_the_poisoned_requests_fail_with_the_generic_message(server):
    async def infer(client, i):
        tensor = triton.InferInput("input", [1, 1, 32, 32], "FP32")
        tensor.set_data_from_numpy(_input(i in POISONED, i))
        try:
            return (await client.infer(MODEL, [tensor])).as_numpy("logits")
        except InferenceServerException as error:
            return error

    async def main():
        async with triton_aio.InferenceServerClient(server.grpc_target) as client:
            return await asyncio.gather(*(infer(client, i) for i in range(REQUESTS // 2)))

    answers = asyncio.run(main())
    failed = {i: a for i, a in enumerate(answers) if isinstance(a, InferenceServerException)}
    assert sorted(failed) == [i for i in POISONED if i < REQUESTS // 2]
    for error in failed.values():
        assert error.status() == "StatusCode.INTERNAL" and error.message() == InferenceFailed.ON_INPUT
    models = httpx.get(server.url + "/models", timeout=10).json()["models"]
    assert all(i["healthy"] and i["last_error"] is None for i in models[0]["instances"])
