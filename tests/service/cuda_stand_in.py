"""A GPU host on any CPU (docs/design.md 2.5): runs a module in a process where ONNX Runtime has a CUDA
provider and NVML sees GPUs, so that the service's GPU code paths run in CI.

    CUDA_STAND_IN_GPUS=2 python -m tests.service.cuda_stand_in -m stepnet.cli serve ...

Before the module runs, three things are replaced:
- `onnxruntime.get_available_providers` lists CUDAExecutionProvider;
- `onnxruntime.InferenceSession` is StandInSession: asked for the CUDA provider, it records the
  provider options (device_id, ...), refuses a device_id CUDA would not number, as CUDA does, and
  reports CUDAExecutionProvider first, while a CPU session of the same graph and options does the
  arithmetic (IO binding included);
- `pynvml` is StandInNvml: CUDA_STAND_IN_GPUS devices with fixed memory and utilization figures
  (memory_used etc. below), recording the handles asked for. Like NVML, it ignores
  CUDA_VISIBLE_DEVICES, which the service must apply itself.

CUDA_STAND_IN_RECORD names a file that gets one JSON line per call recorded (`recorded` reads
it back); CUDA_STAND_IN_PROVIDER=fails makes the CUDA provider fail to load, as it does where
the CUDA libraries are missing: onnxruntime prints an error and the session runs on the CPU.

Why a launcher in tests/ rather than a switch in service/: the service then holds no test code,
and everything it does on a GPU host (choose_device, visible_gpus, placements, Session and its IO
binding, pick_file, GpuCollector, the routes) runs unchanged in a real `stepnet serve` process;
only onnxruntime's and NVML's answers are stand-ins. What this cannot show (CUDA kernels, real
memory figures, fp16 speed) is what `stepnet bench --parts gpu` measures on a real GPU.
"""

import json
import os
import runpy
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
GPUS, RECORD, PROVIDER = "CUDA_STAND_IN_GPUS", "CUDA_STAND_IN_RECORD", "CUDA_STAND_IN_PROVIDER"
LAUNCHER = ("-m", "tests.service.cuda_stand_in")       # python LAUNCHER -m module args...
GIB = 2 ** 30
MEMORY_TOTAL = 80 * GIB


def memory_used(index: int) -> int:
    """What the stand-in NVML reports for the GPU at NVML `index`."""
    return (index + 1) * GIB


def utilization(index: int) -> int:
    """Percent busy, as NVML reports it."""
    return 10 * (index + 1)


def uuid(index: int) -> str:
    return f"GPU-00000000-0000-0000-0000-{index:012d}"


def environ(gpus: int, record: Path, provider: str = "loads", visible: str | None = None) -> dict[str, str | None]:
    """The environment of a server started under the stand-ins; CUDA_VISIBLE_DEVICES unset
    (None) unless given."""
    return {GPUS: str(gpus), RECORD: str(record), PROVIDER: provider, "CUDA_VISIBLE_DEVICES": visible}


def recorded(record: Path, call: str | None = None) -> list[dict[str, Any]]:
    """The calls recorded so far, in order (those named `call` only, if given)."""
    lines = record.read_text().splitlines() if record.exists() else []
    return [entry for entry in map(json.loads, lines) if call is None or entry["call"] == call]


class Recorder:
    def __init__(self, path: str | None):
        self.path, self._lock = path, threading.Lock()

    def __call__(self, call: str, **details: Any) -> None:
        if self.path:
            with self._lock, open(self.path, "a") as f:
                f.write(json.dumps({"call": call, **details}) + "\n")


def _cuda_numbers(gpus: int) -> int:
    """How many devices CUDA numbers for this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return gpus if visible is None else min(gpus, len(visible.split(",")))


def stand_in_session(ort: types.ModuleType, gpus: int, provider_loads: bool, record: Recorder) -> type:
    cpu_session = ort.InferenceSession

    class StandInSession:
        """onnxruntime.InferenceSession on a host with `gpus` CUDA devices; a CPU session computes."""

        def __init__(self, model: bytes | str, sess_options: Any = None,
                     providers: Sequence[str | tuple[str, dict]] | None = None,
                     provider_options: Sequence[dict] | None = None, **kwargs: Any):
            names = [p[0] if isinstance(p, tuple) else p for p in providers or [CPU]]
            options = [dict(p[1]) if isinstance(p, tuple) else {} for p in providers or [CPU]]
            for i, extra in enumerate(provider_options or ()):
                options[i].update(extra)
            cuda = dict(options[names.index(CUDA)]) if CUDA in names else None
            threads = sess_options.intra_op_num_threads if sess_options is not None else 0
            record("InferenceSession", providers=names, cuda_options=cuda, intra_op_threads=threads)
            on_cuda = cuda is not None and provider_loads
            if cuda is None:
                self.device_id = None
            elif not provider_loads:
                sys.stderr.write("[E:onnxruntime:Default, provider_bridge_ort.cc] Failed to load library "
                                 "libonnxruntime_providers_cuda.so (stand-in: CUDA_STAND_IN_PROVIDER=fails)\n")
                self.device_id = None
            else:
                self.device_id = int(cuda.get("device_id", 0))
                if not 0 <= self.device_id < _cuda_numbers(gpus):
                    raise RuntimeError(f"CUDA failure 101: invalid device ordinal ; GPU={self.device_id}")
            self._session = cpu_session(model, sess_options, providers=[CPU], **kwargs)
            self._providers = [CUDA, CPU] if on_cuda else [CPU]
            self._bound = False

        def get_providers(self) -> list[str]:
            return list(self._providers)

        def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
            if not self._bound:      # once per session: that the GPU path (IO binding) runs
                self._bound = True
                record("run_with_iobinding", device_id=self.device_id)
            self._session.run_with_iobinding(binding, run_options)

        def __getattr__(self, name: str) -> Any:
            if name == "_session":         # not made yet: the CPU session failed
                raise AttributeError(name)
            return getattr(self._session, name)

    return StandInSession


@dataclass(frozen=True)
class _Memory:
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class _Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class _Handle:
    index: int


class StandInNvml(types.ModuleType):
    """pynvml on a host with `gpus` GPUs, indexed 0..gpus-1 by NVML."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: int, record: Recorder):
        super().__init__("pynvml", "NVML stand-in (tests.service.cuda_stand_in)")
        self._gpus, self._record = gpus, record

    def nvmlInit(self) -> None:
        self._record("nvmlInit")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return self._gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._record("nvmlDeviceGetHandleByIndex", index=index)
        if not 0 <= index < self._gpus:
            raise self.NVMLError("Invalid Argument")
        return _Handle(index)

    def nvmlDeviceGetHandleByUUID(self, value: str | bytes) -> _Handle:
        text = value.decode() if isinstance(value, bytes) else value
        self._record("nvmlDeviceGetHandleByUUID", uuid=text)
        for index in range(self._gpus):
            if uuid(index) == text:
                return _Handle(index)
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        return handle.index

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return uuid(handle.index)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> _Memory:
        used = memory_used(handle.index)
        return _Memory(MEMORY_TOTAL, used, MEMORY_TOTAL - used)

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> _Utilization:
        return _Utilization(utilization(handle.index), 0)


def install(gpus: int, record_path: str | None, provider_loads: bool) -> None:
    """Replace onnxruntime's provider list and session, and pynvml, in this process."""
    import onnxruntime

    record = Recorder(record_path)
    onnxruntime.InferenceSession = stand_in_session(onnxruntime, gpus, provider_loads, record)
    onnxruntime.get_available_providers = lambda: [CUDA, CPU]
    sys.modules["pynvml"] = StandInNvml(gpus, record)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit(f"usage: {GPUS}=N python -m tests.service.cuda_stand_in -m MODULE [ARGS...]")
    install(int(os.environ[GPUS]), os.environ.get(RECORD), os.environ.get(PROVIDER, "loads") != "fails")
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
