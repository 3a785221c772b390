"""ONNX Runtime sessions: their options, and one batch through a session, on the device
service.inference.placement chose. CUDA sessions are bound to their GPU through the provider's
device_id, use cudnn_conv_algo_search=HEURISTIC (EXHAUSTIVE makes every new batch shape take
seconds) and IO binding; CPU sessions get the intra-op threads placement gave them.
"""

import logging
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from service.core.errors import ModelLoadError
from service.inference.placement import CPU, CUDA, Device
from service.telemetry.thread_names import os_thread_name

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
NO_FOLDER = "/dev/null/no-external-data"


class Session:
    """One ONNX model on one provider: run() takes a (B, C, H, W) batch, returns the outputs."""

    def __init__(self, model: bytes, device: Device, gpu: int | None, intra_op_threads: int,
                 output_names: Sequence[str], label: str, solo: bool = False):
        self.session = _create(model, device, gpu, intra_op_threads, label)
        self.solo = solo          # the batcher gives it a batch only while no other session runs
        self.provider = self.session.get_providers()[0]
        self.gpu = (gpu or 0) if self.provider == CUDA else None     # the CUDA ordinal it runs on
        self.device = "cpu" if self.gpu is None else f"cuda:{self.gpu}"
        self.threads = None if self.provider == CUDA else intra_op_threads
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
        # A failed run raises with onnxruntime's text, which service.inference.batcher logs once per failing
        # request; onnxruntime's own ERROR line would come once per run of the batch's retries.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        if not self._io_binding:
            return self.session.run(self.output_names, {self.input.name: batch}, self._run_options)
        binding = self.session.io_binding()       # one host->device copy in, outputs stay on device
        binding.bind_cpu_input(self.input.name, batch)
        for name in self.output_names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding, self._run_options)
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
    # Graphs are loaded from bytes: external data would be read relative to the working directory.
    # A folder under /dev/null can hold no file, so no external data loads (service.repository.external_data).
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_FOLDER)
    return options


def _create(model: bytes, device: Device, gpu: int | None, intra_op_threads: int,
            label: str) -> ort.InferenceSession:
    with os_thread_name("onnxruntime"):        # the intra-op pool's threads take this name
        return _session(model, device, gpu, intra_op_threads, label)


def _session(model: bytes, device: Device, gpu: int | None, intra_op_threads: int,
             label: str) -> ort.InferenceSession:
    if device.kind == "cuda":
        cuda_options = {"device_id": gpu or 0, "cudnn_conv_algo_search": "HEURISTIC",
                        "do_copy_in_default_stream": True}
        try:
            session = ort.InferenceSession(model, session_options(None),
                                           providers=[(CUDA, cuda_options), CPU])
        except Exception as exc:
            raise ModelLoadError(f"{label}: onnxruntime cannot load the model: {exc}",
                                 f"{label}: onnxruntime cannot load the model") from None
        if session.get_providers()[0] == CUDA:
            log.info("%s: %s on cuda:%d (%s)", label, CUDA, gpu or 0, device.reason)
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
