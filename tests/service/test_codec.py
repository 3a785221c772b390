"""service.v2.codec without HTTP: the Open Inference Protocol's tensors in JSON and in the
binary extension, in and out, against the committed default model's metadata."""

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from service.inference.batcher import BatchResult
from service.core.errors import BadRequest
from service.v2.codec import HEADER_LENGTH, decode_request, encode_response
from stepnet.repository import METADATA_FILE
from stepnet.repository.metadata import parse

META = parse((Path(__file__).resolve().parents[2] / "model_repository" / "stepnet-digits" / "1" /
              METADATA_FILE).read_bytes())
SHAPE = [1, 32, 32]


def binary_body(request: dict, *blobs: bytes) -> tuple[bytes, str]:
    header = json.dumps(request).encode()
    return header + b"".join(blobs), str(len(header))


def test_fp32_in_json_nested_or_flat():
    values = np.arange(2 * 1024, dtype=np.float32).reshape(2, *SHAPE)
    for data in (values.tolist(), values.ravel().tolist()):
        body = json.dumps({"inputs": [{"name": "input", "shape": [2, *SHAPE], "datatype": "FP32", "data": data}]})
        decoded = decode_request(body.encode(), None, META, max_rows=8)
        np.testing.assert_array_equal(decoded.tensor, values)
        assert decoded.images is None
        assert decoded.outputs == [(name, False) for name in ("logits", "probabilities", "step_size", "nsi",
                                                              "stiffness_score", "unusual")]


def test_fp32_and_bytes_in_binary():
    values = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype("<f4")
    body, length = binary_body({"inputs": [{"name": "input", "shape": [3, *SHAPE], "datatype": "FP32",
                                            "parameters": {"binary_data_size": values.nbytes}}]},
                               values.tobytes())
    np.testing.assert_array_equal(decode_request(body, length, META, 8).tensor, values)
    images = [b"\x89PNG first", b"GIF89a second"]
    packed = b"".join(struct.pack("<I", len(i)) + i for i in images)
    body, length = binary_body({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                            "parameters": {"binary_data_size": len(packed)}}],
                                "outputs": [{"name": "nsi", "parameters": {"binary_data": True}}]}, packed)
    decoded = decode_request(body, length, META, 8)
    assert decoded.images == images and decoded.outputs == [("nsi", True)]


def test_images_in_json_are_base64():
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(b"jpeg bytes").decode()]}]})
    assert decode_request(body.encode(), None, META, 8).images == [b"jpeg bytes"]


@pytest.mark.parametrize("request_, message", [
    ({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0] * 3072}]}, "expected [B, 1, 32, 32]"),
    ({"inputs": [{"name": "input", "shape": [9, *SHAPE], "datatype": "FP32", "data": [0] * 9216}]}, "batch size 9"),
    ({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0] * 1023 + [None]}]}, "not finite"),
    ({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "INT8", "data": [0] * 1024}]}, "expected FP32"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, "not base64"),
    ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": []}]}, "unknown input"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "outputs": [{"name": "features"}]}, "unknown output"),
])
def test_what_a_request_gets_wrong_is_named(request_, message):
    with pytest.raises(BadRequest) as error:
        decode_request(json.dumps(request_).encode(), None, META, 8)
    assert message in error.value.message


def test_binary_sizes_must_add_up():
    body, length = binary_body({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32",
                                            "parameters": {"binary_data_size": 4096}}]}, b"\0" * 100)
    with pytest.raises(BadRequest, match="binary_data_size 4096"):
        decode_request(body, length, META, 8)
    with pytest.raises(BadRequest, match="not a number"):
        decode_request(body, "twelve", META, 8)


def _results(n: int) -> list[BatchResult]:
    layers = len(META.layers)
    nsi = np.ones(layers, np.float32)
    nsi[0] = np.nan                                   # first block of a stage
    return [BatchResult((np.arange(10, dtype=np.float32) + i, np.full((layers, 3), 0.5, np.float32), nsi,
                         np.float32(0.5 + 2 * i), np.bool_(i % 2 == 1)), 0.0, 0.001, n) for i in range(n)]


def test_responses_in_json_carry_null_for_undefined_nsi():
    decoded = decode_request(json.dumps({"id": "r1", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                                                  "data": ["eA==", "eQ=="]}]}).encode(), None, META, 8)
    body, headers = encode_response(decoded, META, _results(2))
    assert headers == {"Content-Type": "application/json"}
    response = json.loads(body)
    assert response["id"] == "r1" and response["model_version"] == "1"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["logits"]["shape"] == [2, 10] and outputs["nsi"]["shape"] == [2, len(META.layers)]
    assert outputs["nsi"]["data"][0] is None and outputs["nsi"]["data"][1] == 1.0
    probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(2, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-6)
    assert outputs["stiffness_score"] == {"name": "stiffness_score", "datatype": "FP32", "shape": [2], "data": [0.5, 2.5]}
    assert outputs["unusual"] == {"name": "unusual", "datatype": "BOOL", "shape": [2], "data": [False, True]}


def test_the_unusual_flag_as_binary_is_one_byte_a_row():
    decoded = decode_request(json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                                     "data": ["eA==", "eQ=="]}],
                                         "parameters": {"binary_data_output": True}}).encode(), None, META, 8)
    body, headers = encode_response(decoded, META, _results(2))
    header = json.loads(body[:int(headers[HEADER_LENGTH])])
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in header["outputs"]}
    assert sizes["unusual"] == 2 and sizes["stiffness_score"] == 8
    assert body.endswith(b"\x00\x01")                    # the last output, unusual: False, True


def test_binary_outputs_follow_the_json_header():
    decoded = decode_request(json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
                                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                                     {"name": "step_size"}]}).encode(), None, META, 8)
    body, headers = encode_response(decoded, META, _results(1))
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    logits, step_size = header["outputs"]
    assert logits["parameters"]["binary_data_size"] == 40 and "data" not in logits
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<f4"), np.arange(10, dtype=np.float32))
    assert step_size["data"][:3] == [0.5, 0.5, 0.5]
