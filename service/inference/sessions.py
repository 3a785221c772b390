"""ONNX Runtime: which devices, session options, and one batch through a session.

STEPNET_DEVICE is `auto`, `cpu`, `cuda` (every visible GPU) or a list of GPUs (`cuda:0,1,3`, or
`cuda:0,cuda:1`). `auto` takes the CUDA provider on every visible GPU only when one exists and
the provider is in this onnxruntime build, and the CPU otherwise; the log says which and why.
Each model version then gets STEPNET_INSTANCES sessions on each of those devices (Triton's
instance groups, service.inference.batcher runs them concurrently). CUDA sessions are bound to their GPU
through the provider's device_id, use cudnn_conv_algo_search=HEURISTIC (EXHAUSTIVE makes every new
batch shape take seconds) and IO binding; CPU sessions share the cores between them
(service.config.settings.Settings.threads_per_instance).
"""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.config.settings import parse_device
from service.core.errors import ModelLoadError

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
NO_FOLDER = "/dev/null/no-external-data"


@dataclass(frozen=True)
class Device:
    kind: str                  # "cuda" | "cpu"
    reason: str                # why: shown in the log
    strict: bool = False       # STEPNET_DEVICE=cuda...: no fallback to the CPU
    gpus: tuple[int, ...] = ()     # CUDA ordinals the instances go to (as CUDA_VISIBLE_DEVICES numbers them)

    @property
    def names(self) -> tuple[str, ...]:
        """The devices as /models and /metrics label them: cpu, or cuda:N per GPU."""
        return tuple(f"cuda:{i}" for i in self.gpus) if self.kind == "cuda" else ("cpu",)


def visible_gpus() -> tuple[int, str]:
    """(how many GPUs CUDA will number for this process, why). CUDA_VISIBLE_DEVICES narrows what
    NVML sees (NVML ignores it); an entry CUDA cannot parse ends the list, as in CUDA itself."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:   # no driver, no library: NVML says why in its message
        return 0, f"no NVIDIA GPU ({type(exc).__name__}: {exc})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",")]
        usable = []
        for entry in entries:
            if not entry or entry.startswith("-") or not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            usable.append(entry)
        count = min(count, len(usable))
        return count, f"{count} NVIDIA GPU(s) visible (CUDA_VISIBLE_DEVICES={visible})"
    return count, f"{count} NVIDIA GPU(s) found" if count else "NVML sees no NVIDIA GPU"


def choose_device(requested: str) -> Device:
    """Resolve STEPNET_DEVICE once per process: auto -> every visible GPU when a GPU and the
    provider exist, else the CPU. A GPU asked for by number must exist."""
    kind, ids = parse_device(requested)
    if kind == "cpu":
        return Device("cpu", "STEPNET_DEVICE=cpu")
    count = 0
    if CUDA not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider"
    else:
        count, reason = visible_gpus()
    if count:
        missing = [i for i in ids or () if i >= count]
        if missing:
            raise ModelLoadError(f"STEPNET_DEVICE={requested}: no GPU {', '.join(map(str, missing))} "
                                 f"({reason}; numbered from 0)")
        return Device("cuda", f"STEPNET_DEVICE={requested}: {reason}", strict=kind == "cuda",
                      gpus=ids or tuple(range(count)))
    if kind == "cuda":
        raise ModelLoadError(f"STEPNET_DEVICE={requested}, but {reason}")
    return Device("cpu", f"STEPNET_DEVICE=auto: {reason}")


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
