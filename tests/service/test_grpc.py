"""The Open Inference Protocol over gRPC (issue 15), against real `stepnet serve` processes:
tritonclient.grpc unchanged, grpc.health.v1, every error as its status code, shared batches,
deadlines, overload, SIGTERM and the port switch."""

import asyncio
import io
import os
import signal
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

MODEL = "stepnet-digits"
ADMIN_KEY = "grpc-admin-key-0123456789"
pytestmark = pytest.mark.timeout(180)


def png(digit: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, "PNG")
    return buf.getvalue()


def images_input(encoded: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=object))
    return tensor


def tensor_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    return tensor


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status()


@pytest.fixture(scope="module")
def grpc_server(start_server, single_model_repository):
    return start_server(single_model_repository, cli=True, admin_key=ADMIN_KEY, max_queue_delay_ms=20,
                        access_log="false")


@pytest.fixture(scope="module")
def client(grpc_server):
    with triton.InferenceServerClient(grpc_server.grpc_target) as c:
        yield c


def test_health_and_metadata_through_tritonclient(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "stepnet" and "model_repository" in server["extensions"]
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["versions"] == ["1"] and {t["name"] for t in meta["inputs"]} == {"input", "image"}
    assert {t["name"] for t in meta["outputs"]} == {"logits", "probabilities", "step_size", "nsi", "stiffness_score",
                                                    "unusual"}


def test_standard_health_service(grpc_server):
    with grpc.insecure_channel(grpc_server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_encoded_images_give_the_probabilities_of_predict(client, grpc_server, digits):
    images, labels = digits
    encoded = [png(x) for x in images[:4]]
    result = client.infer(MODEL, [images_input(encoded)],
                          outputs=[triton.InferRequestedOutput(n) for n in ("probabilities", "step_size", "nsi")])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (4, 10) and list(probabilities.argmax(1)) == list(labels[:4])
    assert result.as_numpy("step_size").shape == (4, 9, 3) and np.isnan(result.as_numpy("nsi")[:, 0]).all()
    assert result.get_response().raw_output_contents          # binary outputs: tritonclient's default
    for i, data in enumerate(encoded):
        rest = httpx.post(grpc_server.url + "/predict?top_k=10", files={"file": ("d.png", data)}, timeout=30).json()
        for p in rest["predictions"]:
            assert abs(probabilities[i, p["index"]] - p["probability"]) < 1e-6


def test_fp32_tensors_and_outputs_in_contents(client, grpc_server):
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    logits = client.infer(MODEL, [tensor_input(x)]).as_numpy("logits")
    assert logits.shape == (3, 10)
    # the same rows in `contents`, the outputs asked for as non-binary: they come in `contents` too
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 1, 32, 32])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    out = request.outputs.add(name="logits")
    out.parameters["binary_data"].bool_param = False
    with grpc.insecure_channel(grpc_server.grpc_target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert not reply.raw_output_contents and list(reply.outputs[0].shape) == [3, 10]
    np.testing.assert_allclose(np.asarray(reply.outputs[0].contents.fp32_contents).reshape(3, 10), logits, atol=1e-6)


def test_a_clients_mistakes_get_their_status_codes(client, digits):
    image = images_input([png(digits[0][0])])
    x = np.zeros((1, 1, 32, 32), np.float32)
    assert status_of(lambda: client.infer("nope", [image])) == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.infer(MODEL, [image], model_version="7")) == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.infer(MODEL, [image], model_version="01")) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.infer(MODEL, [tensor_input(np.zeros((1, 1, 31, 32)))])) == \
        "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.infer(MODEL, [images_input([b"not an image"])])) == \
        "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.infer(MODEL, [tensor_input(np.full_like(x, np.nan))])) == \
        "StatusCode.INVALID_ARGUMENT"
    classified = [triton.InferRequestedOutput("probabilities", class_count=3)]
    assert status_of(lambda: client.infer(MODEL, [image], outputs=classified)) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.infer(MODEL, [tensor_input(x), image])) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.is_model_ready("nope")) == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.get_model_metadata(MODEL, "1.0")) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.is_model_ready(MODEL, "²")) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.get_model_metadata("")) == "StatusCode.INVALID_ARGUMENT"


def test_repository_extension_with_the_admin_key(client):
    assert [(m.name, m.version, m.state) for m in client.get_model_repository_index().models] == [(MODEL, "1", "READY")]
    assert status_of(lambda: client.unload_model(MODEL)) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: client.unload_model(MODEL, headers={"authorization": "Bearer wrong-key-wrong-key"})) == \
        "StatusCode.UNAUTHENTICATED"
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client.unload_model(MODEL, headers=admin)
    assert status_of(lambda: client.is_model_ready(MODEL)) == "StatusCode.NOT_FOUND"
    client.load_model(MODEL, headers=admin)
    assert client.is_model_ready(MODEL)


def test_limits_overload_and_deadlines(start_server, single_model_repository, digits, metric):
    server = start_server(single_model_repository, cli=True, max_upload_bytes=4096, max_queue_size=2,
                          max_batch_size=1, access_log="false")
    encoded = png(digits[0][0])
    with triton.InferenceServerClient(server.grpc_target) as c:
        big = [np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes()]
        assert status_of(lambda: c.infer(MODEL, [images_input(big)])) == "StatusCode.RESOURCE_EXHAUSTED"
        assert status_of(lambda: c.unload_model(MODEL)) == "StatusCode.PERMISSION_DENIED"   # no admin key
        before = httpx.get(server.url + "/stiffness").json()["count"]
        assert status_of(lambda: c.infer(MODEL, [images_input([encoded])], client_timeout=0.001)) == \
            "StatusCode.DEADLINE_EXCEEDED"
        time.sleep(1.0)
        assert httpx.get(server.url + "/stiffness").json()["count"] == before      # the work was dropped

    async def burst() -> list:
        async with triton_aio.InferenceServerClient(server.grpc_target) as c:
            calls = [c.infer(MODEL, [images_input([encoded])]) for _ in range(24)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert refused and all(o.status() == "StatusCode.UNAVAILABLE" for o in refused), refused
    assert metric(server.url, "stepnet_requests_total", endpoint="ModelInfer", status="503",
                  protocol="grpc") == len(refused)
    with pytest.raises(KeyError):
        metric(server.url, "stepnet_requests_total", endpoint="ModelInfer", status="500", protocol="grpc")


def test_retry_information_on_overload(start_server, single_model_repository, digits):
    server = start_server(single_model_repository, cli=True, max_queue_size=1, max_batch_size=1,
                          max_queue_delay_ms=200, access_log="false")
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png(digits[0][0]))

    async def burst():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(request, timeout=30) for _ in range(8)]
            return await asyncio.gather(*calls, return_exceptions=True)

    refused = [o for o in asyncio.run(burst()) if isinstance(o, grpc.aio.AioRpcError)]
    assert refused and {o.code() for o in refused} == {grpc.StatusCode.UNAVAILABLE}
    trailers = dict(refused[0].trailing_metadata())
    assert trailers["retry-after"] == "1" and trailers["grpc-retry-pushback-ms"] == "1000"


def test_grpc_and_rest_share_the_batches(grpc_server, digits, metric):
    encoded = [png(x) for x in digits[0][:16]]

    async def traffic():
        async with triton_aio.InferenceServerClient(grpc_server.grpc_target) as g, \
                httpx.AsyncClient(base_url=grpc_server.url, timeout=30) as rest:
            grpc_calls = [g.infer(MODEL, [images_input([e])]) for e in encoded]
            rest_calls = [rest.post("/predict", files={"file": ("d.png", e)}) for e in encoded]
            return await asyncio.gather(*grpc_calls, *rest_calls)

    for _ in range(3):
        results = asyncio.run(traffic())
        assert all(r.status_code == 200 for r in results[16:])
    labels = {"model": MODEL, "version": "1"}
    assert metric(grpc_server.url, "stepnet_mixed_protocol_batches_total", **labels) > 0
    assert metric(grpc_server.url, "stepnet_batch_rows_total", protocol="grpc", **labels) >= 48
    assert metric(grpc_server.url, "stepnet_batch_rows_total", protocol="rest", **labels) >= 48


def test_sigterm_answers_every_call_in_flight(start_server, single_model_repository, digits):
    server = start_server(single_model_repository, cli=True, max_queue_delay_ms=300, max_batch_size=64,
                          access_log="false")
    encoded = png(digits[0][0])

    async def calls():
        async with triton_aio.InferenceServerClient(server.grpc_target) as c:
            pending = [asyncio.ensure_future(c.infer(MODEL, [images_input([encoded])])) for _ in range(8)]
            await asyncio.sleep(0.1)                      # queued, waiting for the batch to fill
            os.kill(server.proc.pid, signal.SIGTERM)
            await asyncio.sleep(0.05)
            late = await asyncio.gather(c.infer(MODEL, [images_input([encoded])]), return_exceptions=True)
            return await asyncio.gather(*pending, return_exceptions=True), late[0]

    outcomes, late = asyncio.run(calls())
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    assert isinstance(late, InferenceServerException) and late.status() == "StatusCode.UNAVAILABLE"
    assert server.proc.wait(30) in (0, -signal.SIGTERM)       # uvicorn re-raises the signal it handled


def listening_ports(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.exists(f"/proc/{pid}/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:               # LISTEN
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def test_port_zero_turns_grpc_off(start_server, single_model_repository, grpc_server):
    assert grpc_server.grpc_port in listening_ports(grpc_server.proc.pid)
    server = start_server(single_model_repository, cli=True, grpc_port=0)
    assert listening_ports(server.proc.pid) == {server.port}
