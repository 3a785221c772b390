"""ONNX Runtime: which execution provider, session options, and one batch through a session.

STEPNET_DEVICE=auto takes the CUDA provider only when it really loads and falls back to the CPU
provider otherwise; the log says which and why. CUDA sessions use cudnn_conv_algo_search=HEURISTIC
(EXHAUSTIVE makes every new batch shape take seconds) and IO binding; CPU sessions use one
intra-op thread per core.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.errors import ModelLoadError

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class Device:
    kind: str          # "cuda" | "cpu"
    reason: str        # why: shown in the log
    strict: bool = False   # STEPNET_DEVICE=cuda: no fallback to the CPU


def choose_device(requested: str) -> Device:
    """Resolve STEPNET_DEVICE once per process: auto -> cuda when a GPU and the provider exist."""
    if requested == "cpu":
        return Device("cpu", "STEPNET_DEVICE=cpu")
    if CUDA not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider"
    else:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            reason = f"{count} NVIDIA GPU(s) found" if count else "NVML sees no NVIDIA GPU"
        except Exception as exc:   # no driver, no library: NVML says why in its message
            count, reason = 0, f"no NVIDIA GPU ({type(exc).__name__}: {exc})"
        if count:
            return Device("cuda", f"STEPNET_DEVICE={requested}: {reason}", strict=requested == "cuda")
    if requested == "cuda":
        raise ModelLoadError(f"STEPNET_DEVICE=cuda, but {reason}")
    return Device("cpu", f"STEPNET_DEVICE=auto: {reason}")


class Session:
    """One ONNX model on one provider: run() takes a (B, C, H, W) batch, returns the outputs."""

    def __init__(self, model: bytes, device: Device, intra_op_threads: int, output_names: Sequence[str],
                 label: str):
        self.session = _create(model, device, intra_op_threads, label)
        self.provider = self.session.get_providers()[0]
        self.output_names = list(output_names)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{label}: the graph has {len(inputs)} inputs, expected 1")
        self.input = inputs[0]
        if self.input.type not in _DTYPES:
            raise ModelLoadError(f"{label}: input type {self.input.type} is not float or float16")
        self.input_dtype = np.dtype(_DTYPES[self.input.type])
        missing = set(self.output_names) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise ModelLoadError(f"{label}: the graph has no output(s) {', '.join(sorted(missing))}")
        self._io_binding = self.provider == CUDA

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        if not self._io_binding:
            return self.session.run(self.output_names, {self.input.name: batch})
        binding = self.session.io_binding()       # one host->device copy in, outputs stay on device
        binding.bind_cpu_input(self.input.name, batch)
        for name in self.output_names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
        # Idle intra-op threads spin by default, taking the cores that decode the next images
        # (on 2 cores: half the CPU per request, twice the p50 latency).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3            # errors only: provider placement notes are noise
    return options


def _create(model: bytes, device: Device, intra_op_threads: int, label: str) -> ort.InferenceSession:
    if device.kind == "cuda":
        cuda_options = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}
        try:
            session = ort.InferenceSession(model, session_options(None),
                                           providers=[(CUDA, cuda_options), CPU])
        except Exception as exc:
            raise ModelLoadError(f"{label}: onnxruntime cannot load the model: {exc}",
                                 f"{label}: onnxruntime cannot load the model") from None
        if session.get_providers()[0] == CUDA:
            log.info("%s: %s (%s)", label, CUDA, device.reason)
            return session
        if device.strict:
            raise ModelLoadError(f"{label}: STEPNET_DEVICE=cuda, but the CUDA provider did not load "
                                 f"(see the onnxruntime message above)")
        log.warning("%s: the CUDA provider did not load (see the onnxruntime message above); "
                    "falling back to the CPU", label)
    try:
        session = ort.InferenceSession(model, session_options(intra_op_threads), providers=[CPU])
    except Exception as exc:
        raise ModelLoadError(f"{label}: onnxruntime cannot load the model: {exc}",
                             f"{label}: onnxruntime cannot load the model") from None
    log.info("%s: %s with %d intra-op threads (%s)", label, CPU, intra_op_threads, device.reason)
    return session
