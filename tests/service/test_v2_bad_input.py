"""Bad v2 requests against the shared server: each gets the protocol's {"error": "..."} with 400
(404 for what does not exist, 413 over the upload limit), never a 500, and the server serves on."""

import base64
import json
import struct

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(60)

INFER = "/v2/models/stepnet-digits/infer"
HEADER = "Inference-Header-Content-Length"


def fp32(shape=(1, 1, 32, 32), **extra) -> dict:
    return {"name": "input", "shape": list(shape), "datatype": "FP32",
            "data": [0.0] * int(np.prod(shape)), **extra}


def image(data, shape=None, **extra) -> dict:
    return {"name": "image", "shape": shape or [len(data)], "datatype": "BYTES", "data": data, **extra}


def binary(request: dict, payload: bytes, length: int | None = None) -> dict:
    """httpx kwargs for a body with the binary tensor data extension."""
    header = json.dumps(request).encode()
    return {"content": header + payload, "headers": {HEADER: str(len(header) if length is None else length)}}


def body(request) -> dict:
    return {"content": json.dumps(request).encode()}


NOT_BASE64 = image(["not base64!"])
BAD_REQUESTS = {
    "not json": {"content": b"{inputs"},
    "json array": body([1, 2]),
    "no inputs": body({"inputs": []}),
    "two inputs": body({"inputs": [fp32(), fp32()]}),
    "unknown input": body({"inputs": [dict(fp32(), name="pixels")]}),
    "wrong datatype": body({"inputs": [dict(fp32(), datatype="FP16")]}),
    "wrong image size": body({"inputs": [fp32((1, 1, 28, 28))]}),
    "shape is not a list of integers": body({"inputs": [dict(fp32(), shape=["1", 1, 32, 32])]}),
    "too few values": body({"inputs": [dict(fp32(), data=[0.0] * 10)]}),
    "values are not numbers": body({"inputs": [dict(fp32(), data=["a"] * 1024)]}),
    "ragged values": body({"inputs": [dict(fp32(), data=[[0.0] * 1024, [0.0]])]}),
    "batch 0": body({"inputs": [fp32((0, 1, 32, 32))]}),
    "batch over STEPNET_MAX_BATCH_SIZE": body({"inputs": [fp32((9, 1, 32, 32))]}),
    "no data": body({"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32"}]}),
    "BYTES not base64": body({"inputs": [NOT_BASE64]}),
    "BYTES not strings": body({"inputs": [image([12])]}),
    "BYTES not an image": body({"inputs": [image([base64.b64encode(b"hello").decode()])]}),
    "BYTES empty element": body({"inputs": [image([""])]}),
    "BYTES count differs from shape": body({"inputs": [image([base64.b64encode(b"x").decode()], shape=[2])]}),
    "BYTES shape not [B]": body({"inputs": [image([base64.b64encode(b"x").decode()], shape=[1, 1])]}),
    "unknown output": body({"inputs": [fp32()], "outputs": [{"name": "softmax"}]}),
    "output twice": body({"inputs": [fp32()], "outputs": [{"name": "nsi"}, {"name": "nsi"}]}),
    "classification extension": body({"inputs": [fp32()], "outputs": [{"name": "logits",
                                                                       "parameters": {"classification": 3}}]}),
    "binary_data not a boolean": body({"inputs": [fp32()], "outputs": [{"name": "logits",
                                                                        "parameters": {"binary_data": "yes"}}]}),
    "shared memory": body({"inputs": [dict(fp32(), parameters={"shared_memory_region": "r"})]}),
    "header length not a number": {"content": b"{}", "headers": {HEADER: "ten"}},
    "header length beyond the body": binary({"inputs": [fp32()]}, b"", length=10**6),
    "binary size beyond the body": binary({"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 4096}}]}, b"\0" * 100),
    "binary size wrong for the shape": binary({"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32",
                                                           "parameters": {"binary_data_size": 100}}]}, b"\0" * 100),
    "binary bytes left over": binary({"inputs": [fp32()]}, b"\0" * 8),
    "binary and JSON data both": binary({"inputs": [dict(fp32(), parameters={"binary_data_size": 4096})]},
                                        b"\0" * 4096),
    "BYTES length prefix truncated": binary({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                         "parameters": {"binary_data_size": 6}}]},
                                            struct.pack("<I", 100) + b"ab"),
    "compressed body": {"content": b"\x1f\x8b", "headers": {"Content-Encoding": "gzip"}},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_infer_request_gets_400(client, case):
    response = client.post(INFER, **BAD_REQUESTS[case])
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error", "request_id"} and isinstance(response.json()["error"], str)


@pytest.mark.parametrize("path, status", [
    ("/v2/models/no-such-model/infer", 404),
    ("/v2/models/stepnet-digits/versions/7/infer", 404),
    ("/v2/models/stepnet-digits/versions/one/infer", 400),
    ("/v2/models/stepnet-digits/versions/07/ready", 400),
    ("/v2/models/no-such-model/ready", 404),
    ("/v2/models/no-such-model", 404),
    ("/v2/no-such-endpoint", 404),
])
def test_unknown_models_versions_and_paths(client, path, status):
    response = client.post(path, **body({"inputs": [fp32()]})) if path.endswith("infer") else client.get(path)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str)


def test_bodies_over_the_upload_limit_get_413(client):
    big = b"{" + b" " * (1024 * 1024) + b"}"                    # the shared server takes 1 MiB
    assert client.post(INFER, content=big).status_code == 413
    chunked = client.post(INFER, content=iter([big[:600_000], big[600_000:]]))   # no Content-Length
    assert chunked.status_code == 413 and isinstance(chunked.json()["error"], str)


def test_the_server_serves_on_after_bad_requests(client, server, digit_png):
    good = {"inputs": [image([base64.b64encode(digit_png).decode()])], "outputs": [{"name": "probabilities"}]}
    response = client.post(INFER, **body(good))
    assert response.status_code == 200, response.text
    assert "Traceback" not in server.log()
