"""Where a model version's sessions run, decided in one place: the device (STEPNET_DEVICE), the
GPUs CUDA numbers for this process (CUDA_VISIBLE_DEVICES), and the sessions on each device with
their intra-op threads (STEPNET_INSTANCES, STEPNET_INTRA_OP_THREADS, STEPNET_CPU_SOLO).

STEPNET_DEVICE is `auto`, `cpu`, `cuda` (every visible GPU) or a list of GPUs (`cuda:0,1,3`, or
`cuda:0,cuda:1`). `auto` takes the CUDA provider on every visible GPU only when one exists and
the provider is in this onnxruntime build, and the CPU otherwise; the log says which and why.
Each model version then gets its instances on each of those devices (Triton's instance groups,
which service.inference.batcher runs concurrently); on the CPU they split the cores, and a solo
session with every core may come last (service.inference.batcher says when it runs). Measured in
benchmarks/results (docs/performance.md).
"""

import os
from dataclasses import dataclass

import onnxruntime as ort

from service.config.settings import Settings, cpu_count, parse_device
from service.core.errors import ModelLoadError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# instances per model version where STEPNET_INSTANCES and serving.json say nothing
DEFAULT_GPU_INSTANCES = 1
DEFAULT_CPU_INSTANCES = 1


def cuda_visible_devices() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES' entries as CUDA reads them (ordinals, GPU- or MIG- UUIDs), up to the
    first it cannot parse, which ends the list as in CUDA itself; None when it is unset. NVML
    ignores the variable, so the service applies it: cuda:N is entry N."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    usable = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry or entry.startswith("-") or not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        usable.append(entry)
    return usable


def nvml_cards(gpus: list[int]) -> dict[str, str]:
    """cuda:N -> how NVML names that card: CUDA_VISIBLE_DEVICES' entry N (an index or a UUID),
    or N itself where the variable is unset."""
    entries = cuda_visible_devices()
    return {f"cuda:{gpu}": entries[gpu] if entries is not None else str(gpu) for gpu in gpus}


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
    entries = cuda_visible_devices()
    if entries is not None:
        count = min(count, len(entries))
        return count, f"{count} NVIDIA GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
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


def threads_per_instance(settings: Settings, instances: int) -> int:
    """Intra-op threads of each CPU session: STEPNET_INTRA_OP_THREADS, or the cores split evenly
    between the instances (at least one each)."""
    return settings.intra_op_threads or max(1, cpu_count() // instances)


def cpu_instances(settings: Settings, instances: int | None) -> list[tuple[int, bool]]:
    """(intra-op threads, solo) of each CPU session of a model version: `instances` (default
    DEFAULT_CPU_INSTANCES, at most one per core) splitting the cores, then the solo session with
    every core where STEPNET_CPU_SOLO is on and the others do not each have them all."""
    cores = cpu_count()
    count = instances or min(DEFAULT_CPU_INSTANCES, cores)
    threads = threads_per_instance(settings, count)
    solo = [(cores, True)] if settings.cpu_solo and count > 1 and threads < cores else []
    return [(threads, False)] * count + solo


def placements(device: Device, settings: Settings, instances: int | None) -> list[tuple[int | None, int, bool]]:
    """(GPU ordinal or None for the CPU, intra-op threads, solo) of each instance of a model
    version: `instances` (or the default) on each device, in device order; on the CPU, the solo
    session last."""
    if device.kind == "cuda":
        count = instances or DEFAULT_GPU_INSTANCES
        return [(gpu, threads_per_instance(settings, count), False) for gpu in device.gpus for _ in range(count)]
    return [(None, threads, solo) for threads, solo in cpu_instances(settings, instances)]
