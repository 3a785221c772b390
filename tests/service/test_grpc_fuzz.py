"""The gRPC counterpart of the schemathesis run: seeded random and malformed ModelInfer requests
over a real channel to a real `stepnet serve`. Every answer is OK or a client error's status;
none is UNKNOWN or INTERNAL, and the server logs no traceback.

Requests are drawn from what a client can get wrong: names, versions, datatypes, shapes,
contents in either place, parameters of every kind, outputs, ids; then valid requests with bytes
flipped, cut or appended. FUZZ_EXAMPLES (default 100) is the number of each kind; FUZZ_SEED
picks them, as for schemathesis.
"""

import os
from collections import Counter

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

from tests.service.conftest import _encode

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
MODEL = "stepnet-digits"
INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED,
                 grpc.StatusCode.DATA_LOSS}


def _parameter(rng: np.random.Generator, message) -> None:
    kind = rng.integers(4)
    if kind == 0:
        message.bool_param = bool(rng.integers(2))
    elif kind == 1:
        message.int64_param = int(rng.integers(-2**40, 2**40))
    elif kind == 2:
        message.string_param = rng.choice(["", "x", "true", "1e309", "\u00e9" * int(rng.integers(1, 50))])
    else:
        message.double_param = float(rng.choice([0.0, -1.0, np.nan, np.inf, 1e300]))


def random_request(rng: np.random.Generator, png: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=str(rng.choice([MODEL, MODEL, "", "nope", "../" + MODEL, "m" * int(rng.integers(60, 3000))])),
        model_version=str(rng.choice(["", "", "1", "0", "01", "-1", "１", "99999999999999999999", "x"])),
        id=str(rng.choice(["", "a", "i" * int(rng.integers(1, 600))])))
    for key in rng.choice(["binary_data_output", "priority", "timeout", "x"], int(rng.integers(0, 3))):
        _parameter(rng, request.parameters[str(key)])
    for _ in range(int(rng.integers(0, 4))):
        name = str(rng.choice(["input", "image", "", "other", "n" * 200]))
        datatype = str(rng.choice(["FP32", "BYTES", "FP16", "INT64", "UINT8", "", "fp32"]))
        shape = [int(d) for d in rng.choice([0, 1, 2, 8, 32, -1, 2**40], int(rng.integers(0, 7)))]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        for key in rng.choice(["binary_data_size", "x"], int(rng.integers(0, 2))):
            _parameter(rng, tensor.parameters[str(key)])
        where = rng.integers(3)
        if where == 0:
            tensor.contents.fp32_contents.extend(rng.normal(size=int(rng.integers(0, 2100))).astype(np.float32).tolist())
        elif where == 1:
            tensor.contents.bytes_contents.extend([png, rng.bytes(int(rng.integers(0, 64)))][:int(rng.integers(1, 3))])
        else:
            request.raw_input_contents.append(rng.bytes(int(rng.choice([0, 4, 1024, 4096]))))
    for _ in range(int(rng.integers(0, 3))):
        output = request.outputs.add(name=str(rng.choice(["logits", "nsi", "step_size", "probabilities", "x", ""])))
        if rng.integers(2):
            _parameter(rng, output.parameters["binary_data"])
    return request


def mutated(rng: np.random.Generator, payload: bytes) -> bytes:
    data = bytearray(payload)
    how = rng.integers(3)
    if how == 0 and data:
        for i in rng.integers(0, len(data), int(rng.integers(1, 8))):
            data[i] = int(rng.integers(256))
    elif how == 1:
        data = data[:int(rng.integers(0, len(data) + 1))]
    else:
        data += rng.bytes(int(rng.integers(1, 32)))
    return bytes(data)


def valid_request(rng: np.random.Generator, png: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    if rng.integers(2):
        request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
    else:
        x = rng.random((1, 1, 32, 32), np.float32)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
        request.raw_input_contents.append(x.tobytes())
    return request


@pytest.fixture(scope="module")
def fuzzed(start_server, single_model_repository):
    return start_server(single_model_repository, cli=True, access_log="false")


def test_random_and_malformed_infer_requests_get_no_server_fault(fuzzed, digits):
    rng = np.random.default_rng(SEED)
    png = _encode(Image.fromarray(digits[0][0]))
    payloads = [random_request(rng, png).SerializeToString() for _ in range(EXAMPLES)]
    payloads += [mutated(rng, valid_request(rng, png).SerializeToString()) for _ in range(EXAMPLES)]
    codes: Counter = Counter()
    faults = []
    with grpc.insecure_channel(fuzzed.grpc_target) as channel:
        call = channel.unary_unary(INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for payload in payloads:
            try:
                call(payload, timeout=20)
                codes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as error:
                codes[error.code()] += 1
                if error.code() in SERVER_FAULTS:
                    faults.append((error.code(), error.details(), payload[:80]))
    print({code.name: n for code, n in codes.items()})
    assert not faults, faults[:5]
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0 and codes[grpc.StatusCode.OK] > 0
    log = fuzzed.log()
    assert "Traceback" not in log, log[log.find("Traceback"):][:3000]
