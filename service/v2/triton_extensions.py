"""Triton's model configuration and statistics extensions: the JSON that Triton's HTTP endpoint
sends (GET /v2/models/<name>/config, /v2/models/stats), which tritonclient and Triton's tools
read. REST sends it as it is; gRPC parses the same dict into model_config_pb2.ModelConfig and
ModelStatisticsResponse, so the two transports cannot differ.

The model takes one of two inputs (service.v2.codec): both are marked `optional`, and the
parameter `input_alternatives` names them ("input,image": send exactly one). Triton has no
standard field for alternatives, and the v2 model metadata none at all.
"""

from collections import Counter
from collections.abc import Iterable

from service.inference.inference_statistics import Duration
from service.inference.served_model import ServedModel
from service.v2.codec import DATATYPES, IMAGE_INPUT, OUTPUTS, PLATFORM, output_dims

BACKEND = "onnxruntime"
ALTERNATIVES = "input_alternatives"


def model_config(served: ServedModel) -> dict:
    """Triton's ModelConfig of one served version. dims leave out the batch axis, as Triton's do
    with max_batch_size > 0; max_batch_size is the most rows one request may send."""
    meta, config = served.meta, served.config
    dims = output_dims(meta)
    devices = Counter(session.device for session in served.sessions)
    return {
        "name": meta.name, "platform": PLATFORM, "backend": BACKEND,
        "version_policy": config.version_policy.model_dump(exclude_none=True),
        "max_batch_size": config.max_request_rows,
        "input": [{"name": meta.input.name, "data_type": "TYPE_FP32", "dims": list(meta.input.shape),
                   "optional": True},
                  {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [], "optional": True}],
        "output": [_output(name, dims[name]) for name in OUTPUTS],
        "dynamic_batching": {"max_queue_delay_microseconds": int(config.max_queue_delay_ms * 1000),
                             "default_queue_policy": {"max_queue_size": config.max_queue_size}},
        "instance_group": [_group(meta.name, device, count) for device, count in devices.items()],
        "default_model_filename": served.file,
        "parameters": {ALTERNATIVES: {"string_value": f"{meta.input.name},{IMAGE_INPUT}"}},
    }


def _output(name: str, dims: list[int]) -> dict:
    """One output's config; a scalar per row is dims [1] reshaped to [], as Triton writes it."""
    out = {"name": name, "data_type": f"TYPE_{DATATYPES[name]}", "dims": dims or [1]}
    return out if dims else {**out, "reshape": {"shape": []}}


def _group(name: str, device: str, count: int) -> dict:
    if device == "cpu":
        return {"name": f"{name}_cpu", "kind": "KIND_CPU", "count": count}
    gpu = int(device.removeprefix("cuda:"))
    return {"name": f"{name}_gpu{gpu}", "kind": "KIND_GPU", "count": count, "gpus": [gpu]}


def model_statistics(versions: Iterable[ServedModel]) -> dict:
    """Triton's ModelStatisticsResponse of these served versions."""
    return {"model_stats": [_version(served) for served in versions]}


def _version(served: ServedModel) -> dict:
    now = served.statistics.current
    durations = {"success": now.success, "fail": now.fail, "queue": now.queue,
                 "compute_input": now.compute_input, "compute_infer": now.compute_infer,
                 "compute_output": now.compute_output, "cache_hit": Duration(), "cache_miss": Duration()}
    return {"name": served.name, "version": str(served.version), "last_inference": now.last_inference_ms,
            "inference_count": now.inference_count, "execution_count": now.execution_count,
            "inference_stats": {key: {"count": d.count, "ns": d.ns} for key, d in durations.items()},
            "batch_stats": []}
