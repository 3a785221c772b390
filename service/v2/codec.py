"""Protocol tensors <-> this service's model inputs and outputs, JSON or binary.

A request sends exactly one input:

    <input.name>  FP32  [B, C, H, W]   already pre-processed, as model.json's `preprocessing` says
    image         BYTES [B]            encoded images (PNG, JPEG, ...), pre-processed as /predict
                                       does; in JSON each element is the image in base64 (a JSON
                                       string cannot hold raw bytes), as binary data each element
                                       is the protocol's 4-byte little-endian length and the bytes

and gets any of the outputs logits [B, K], probabilities [B, K], step_size [B, L, 3],
nsi [B, L] and stiffness_score [B], all FP32 (nsi is NaN, null in JSON, for the first block of a
stage; stiffness_score for a version exported without its calibration), and unusual [B], BOOL
(the stiffness score above the export's threshold or not finite, docs/design.md 1.6).

Binary tensor data extension: the body is the JSON header, then the binary tensors in input order;
the Inference-Header-Content-Length header gives the JSON's length and each binary input's
parameters.binary_data_size its own. Outputs go out as binary where the request's output says
parameters.binary_data (default: the request's parameters.binary_data_output, else false).
"""

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from service.inference.batcher import BatchResult
from service.core.errors import BadRequest, EmptyBody
from service.repository.model_json import ModelMetadata
from service.inference.postprocess import softmax
from service.v2.messages import InferRequest, ModelMetadataResponse, RequestInput, TensorMetadata

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
IMAGE_INPUT = "image"
OUTPUTS = ("logits", "probabilities", "step_size", "nsi", "stiffness_score", "unusual")
DATATYPES = {name: "BOOL" if name == "unusual" else "FP32" for name in OUTPUTS}
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class Decoded:
    request: InferRequest
    tensor: np.ndarray | None          # (B, C, H, W) float32, or None when images were sent
    images: list[bytes] | None
    outputs: list[tuple[str, bool]]    # (output name, as binary data), in the order asked for


def model_metadata(meta: ModelMetadata, versions: list[int]) -> ModelMetadataResponse:
    c, h, w = meta.input.shape
    shapes = {name: [-1, *dims] for name, dims in output_dims(meta).items()}
    return ModelMetadataResponse(
        name=meta.name, versions=[str(v) for v in versions], platform=PLATFORM,
        inputs=[TensorMetadata(name=meta.input.name, datatype="FP32", shape=[-1, c, h, w]),
                TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=name, datatype=DATATYPES[name], shape=shapes[name]) for name in OUTPUTS])


def output_dims(meta: ModelMetadata) -> dict[str, list[int]]:
    """Each output's shape of one row (the batch axis left out)."""
    k, n_layers = len(meta.classes), len(meta.layers)
    return {"logits": [k], "probabilities": [k], "step_size": [n_layers, 3], "nsi": [n_layers],
            "stiffness_score": [], "unusual": []}


# ---------------------------------------------------------------- requests

def decode_request(body: bytes, header_length: str | None, meta: ModelMetadata, max_rows: int) -> Decoded:
    """Raises BadRequest (or EmptyBody) with the reason for anything the request gets wrong."""
    text, binary = _split(body, header_length)
    try:       # pydantic's JSON parser bounds the nesting depth (json.loads recurses until it fails)
        request = InferRequest.model_validate_json(text)
    except ValueError as exc:          # JSON, UTF-8, depth and pydantic errors
        raise BadRequest(f"invalid inference request: {reason(exc)}") from None
    _check_inputs(request, meta)
    return _decode_checked(request, _binary_inputs(request.inputs, binary), meta, max_rows)


def _check_inputs(request: InferRequest, meta: ModelMetadata) -> None:
    if len(request.inputs) != 1:
        raise BadRequest(f"send exactly one input ({meta.input.name} or {IMAGE_INPUT}); got "
                         f"{len(request.inputs)}")
    if any("shared_memory_region" in tensor.parameters for tensor in request.inputs):
        raise BadRequest("shared memory is not supported: send the tensor as data or binary data")


def decode_inputs(request: InferRequest, blobs: list[bytes | None], meta: ModelMetadata,
                  max_rows: int) -> Decoded:
    """A parsed request and each input's bytes (binary data; None where it sent JSON data) -> the
    model input. The transports differ only in how they carry the bytes (REST's body, gRPC's
    raw_input_contents or contents)."""
    _check_inputs(request, meta)
    return _decode_checked(request, blobs, meta, max_rows)


def _decode_checked(request: InferRequest, blobs: list[bytes | None], meta: ModelMetadata,
                    max_rows: int) -> Decoded:
    tensor, blob = request.inputs[0], blobs[0]
    if tensor.name == meta.input.name:
        return Decoded(request, _fp32(tensor, blob, meta, max_rows), None, _outputs(request))
    if tensor.name == IMAGE_INPUT:
        return Decoded(request, None, _images(tensor, blob, max_rows), _outputs(request))
    c, h, w = meta.input.shape
    raise BadRequest(f"unknown input {tensor.name!r}: this model takes {meta.input.name} (FP32 "
                     f"[B, {c}, {h}, {w}]) or {IMAGE_INPUT} (BYTES [B], encoded images)")


def reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
    return body[:n], body[n:]


def _binary_inputs(inputs: list[RequestInput], binary: bytes) -> list[bytes | None]:
    """Each input's binary data (None where it sent JSON data), cut from what follows the JSON."""
    blobs: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            blobs.append(None)
            continue
        if type(size) is not int or size < 0:
            raise BadRequest(f"input {tensor.name}: binary_data_size must be a non-negative integer")
        if tensor.data is not None:
            raise BadRequest(f"input {tensor.name}: has both data and binary_data_size")
        if offset + size > len(binary):
            raise BadRequest(f"input {tensor.name}: binary_data_size {size}, but only "
                             f"{len(binary) - offset} bytes of binary data follow the JSON (its length "
                             f"is the {HEADER_LENGTH} header)")
        blobs.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data beyond what the inputs' "
                         f"binary_data_size declare")
    return blobs


def _batch(name: str, size: int, max_rows: int) -> int:
    if not 1 <= size <= max_rows:
        raise BadRequest(f"input {name}: batch size {size}; this model takes 1 to {max_rows} "
                         f"per request (the smaller of its max_batch_size and max_queue_size: "
                         f"serving.json, else STEPNET_MAX_BATCH_SIZE and STEPNET_MAX_QUEUE_SIZE)")
    return size


def _fp32(tensor: RequestInput, blob: bytes | None, meta: ModelMetadata, max_rows: int) -> np.ndarray:
    c, h, w = meta.input.shape
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {tensor.name}: datatype {tensor.datatype}; expected FP32")
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != (c, h, w):
        raise BadRequest(f"input {tensor.name}: shape {tensor.shape}; expected [B, {c}, {h}, {w}]")
    _batch(tensor.name, tensor.shape[0], max_rows)
    count = math.prod(tensor.shape)
    if blob is not None:
        if len(blob) != 4 * count:
            raise BadRequest(f"input {tensor.name}: {len(blob)} bytes of binary data; shape "
                             f"{tensor.shape} in FP32 is {4 * count}")
        return _finite(tensor.name, np.frombuffer(blob, "<f4").reshape(tensor.shape))
    if tensor.data is None:
        raise BadRequest(f"input {tensor.name}: neither data nor parameters.binary_data_size")
    try:
        with np.errstate(over="ignore"):          # 1e308 becomes inf, refused just below
            values = np.asarray(tensor.data, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(f"input {tensor.name}: data must be numbers (flat or nested, not ragged)") from None
    if values.size != count:
        raise BadRequest(f"input {tensor.name}: {values.size} values; shape {tensor.shape} holds {count}")
    return _finite(tensor.name, values.reshape(tensor.shape))


def _finite(name: str, values: np.ndarray) -> np.ndarray:
    """NaN, null and values beyond float32's range would give NaN outputs and blind the live
    statistics: refused."""
    bad = values.size - int(np.isfinite(values).sum())
    if bad:
        raise BadRequest(f"input {name}: {bad} value(s) are not finite float32 numbers (NaN, null, "
                         f"or beyond +-3.4e38)")
    return values


def _images(tensor: RequestInput, blob: bytes | None, max_rows: int) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {IMAGE_INPUT}: datatype {tensor.datatype}; expected BYTES")
    if len(tensor.shape) != 1:
        raise BadRequest(f"input {IMAGE_INPUT}: shape {tensor.shape}; expected [B]")
    batch = _batch(IMAGE_INPUT, tensor.shape[0], max_rows)
    if blob is not None:
        images = _unpack_bytes(blob, batch)
    elif tensor.data is None:
        raise BadRequest(f"input {IMAGE_INPUT}: neither data nor parameters.binary_data_size")
    else:
        images = [_from_base64(item, i) for i, item in enumerate(tensor.data)]
    if len(images) != batch:
        raise BadRequest(f"input {IMAGE_INPUT}: {len(images)} elements; shape {tensor.shape} holds {batch}")
    for i, image in enumerate(images):
        if not image:
            raise EmptyBody(f"input {IMAGE_INPUT}: element {i} is empty")
    return images


def _unpack_bytes(blob: bytes, batch: int) -> list[bytes]:
    """The protocol's BYTES serialization: per element a uint32 little-endian length, then bytes."""
    out: list[bytes] = []
    offset = 0
    while offset < len(blob) and len(out) <= batch:
        if offset + 4 > len(blob):
            raise BadRequest(f"input {IMAGE_INPUT}: binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + n > len(blob):
            raise BadRequest(f"input {IMAGE_INPUT}: element {len(out)} declares {n} bytes; "
                             f"{len(blob) - offset} are left")
        out.append(blob[offset:offset + n])
        offset += n
    return out


def _from_base64(item, i: int) -> bytes:
    if not isinstance(item, str):
        raise BadRequest(f"input {IMAGE_INPUT}: element {i} is not a string (in JSON, BYTES elements "
                         f"are base64-encoded images)")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input {IMAGE_INPUT}: element {i} is not base64 (in JSON, BYTES elements "
                         f"are base64-encoded images; send raw bytes as binary data)") from None


def _flag(parameters: dict, key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key} must be true or false")
    return value


def _outputs(request: InferRequest) -> list[tuple[str, bool]]:
    default = _flag(request.parameters, "binary_data_output", False)
    if not request.outputs:
        return [(name, default) for name in OUTPUTS]
    out: list[tuple[str, bool]] = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise BadRequest(f"unknown output {output.name!r}; outputs: {', '.join(OUTPUTS)}")
        if output.name in (name for name, _ in out):
            raise BadRequest(f"output {output.name} is asked for twice")
        if "classification" in output.parameters:
            raise BadRequest("the classification extension is not supported; ask for probabilities")
        if "shared_memory_region" in output.parameters:
            raise BadRequest("shared memory is not supported")
        out.append((output.name, _flag(output.parameters, "binary_data", default)))
    return out


# ---------------------------------------------------------------- responses

def output_tensors(decoded: Decoded, results: list[BatchResult]) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, as binary data) of each output asked for, in the order asked: FP32 arrays,
    and bool for `unusual`."""
    logits = np.stack([r.outputs[0] for r in results]).astype(np.float32)          # (B, K)
    tensors = {"logits": lambda: logits,
               "probabilities": lambda: softmax(logits).astype(np.float32),     # (B, K)
               "step_size": lambda: np.stack([r.outputs[1] for r in results]).astype(np.float32),  # (B, L, 3)
               "nsi": lambda: np.stack([r.outputs[2] for r in results]).astype(np.float32),        # (B, L)
               "stiffness_score": lambda: np.array([r.outputs[3] for r in results], np.float32),   # (B,)
               "unusual": lambda: np.array([r.outputs[4] for r in results], bool)}                 # (B,)
    return [(name, tensors[name](), binary) for name, binary in decoded.outputs]


def encode_response(decoded: Decoded, meta: ModelMetadata, results: list[BatchResult]) -> tuple[bytes, dict[str, str]]:
    """-> the body and its headers: JSON alone, or the JSON header and then the binary outputs."""
    header: dict = {"model_name": meta.name, "model_version": str(meta.version)}
    if decoded.request.id is not None:
        header["id"] = decoded.request.id
    outputs, chunks = [], []
    for name, array, binary in output_tensors(decoded, results):
        entry: dict[str, object] = {"name": name, "datatype": DATATYPES[name], "shape": list(array.shape)}
        if binary:
            raw = binary_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_values(array)
        outputs.append(entry)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def binary_bytes(array: np.ndarray) -> bytes:
    """An output as the protocol's binary data: FP32 little-endian, BOOL one byte each."""
    return array.astype(np.bool_ if array.dtype == np.bool_ else "<f4", copy=False).tobytes()


def _json_values(array: np.ndarray) -> list[float | None]:
    values = array.ravel().tolist()
    if np.isfinite(array).all():
        return values
    return [v if math.isfinite(v) else None for v in values]      # JSON has no NaN
