"""GPU part (issue 6, part 4): ONNX Runtime's CUDA provider on the fp32 and fp16 graphs with IO
binding (the batch copied to the device once per batch size, the outputs left there, so the
timing is the GPU's and not the PCIe bus's), against PyTorch eager fp16 channels_last on the
same GPU, batch 1 to 128; and the fp16 graph's parity with fp32 on that GPU.

The device is a parameter: the test suite runs the same code with ONNX Runtime's CPU provider
and PyTorch float32 on the CPU (`CPU_CHECK`), which checks everything but CUDA itself.
"""

import copy
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.timing import Budget, measure_interleaved
from export import runtime, samples, variants
from models import data
from service.inference.placement import Device
from service.inference.sessions import Session
from stepnet.repository import INPUT, OUTPUTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    name: str                 # the OrtValue / torch device: "cuda" or "cpu"
    torch_dtype: torch.dtype  # PyTorch's precision for its eager baseline

    @property
    def torch_label(self) -> str:
        return f"torch_{str(self.torch_dtype).removeprefix('torch.').replace('float', 'fp')}"


GPU = Target("cuda", torch.float16)
CPU_CHECK = Target("cpu", torch.float32)


def unavailable() -> str | None:
    """Why the GPU part cannot run here, or None when it can."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


class Bound:
    """One graph on the target's provider, made as the service makes it (strict: no CPU
    fallback on a GPU); run_on(x) gives a run function with the input and outputs on the device."""

    def __init__(self, proto: onnx.ModelProto, target: Target, threads: int):
        device = Device(target.name, "benchmark", strict=True, gpus=(0,) if target.name == "cuda" else ())
        self.session = Session(proto.SerializeToString(), device, 0, threads, OUTPUTS,
                               f"gpu benchmark ({target.name})").session
        self.target = target

    def run_on(self, x: np.ndarray):
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT, ort.OrtValue.ortvalue_from_numpy(x, self.target.name, 0))
        for name in OUTPUTS:
            binding.bind_output(name, self.target.name, 0)

        def run():
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        return run

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return runtime.run(self.session, images, 128)


def torch_runner(model: torch.nn.Module, target: Target):
    """PyTorch eager in the target's precision, channels_last: x -> a run function."""
    module = copy.deepcopy(model).to(device=target.name, dtype=target.torch_dtype)
    module = module.to(memory_format=torch.channels_last).eval()
    if target.name == "cuda":
        torch.backends.cudnn.benchmark = True       # fixed shapes: let cuDNN pick its kernels

    def on(x: np.ndarray):
        t = torch.from_numpy(x).to(device=target.name, dtype=target.torch_dtype)
        t = t.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                module(t, diagnostics=True)
            if target.name == "cuda":
                torch.cuda.synchronize()
        return run
    return on


def parity(fp16: Bound, fp32: Bound, images: np.ndarray, labels: np.ndarray | None,
           tolerances: variants.VariantTolerances = variants.VariantTolerances()) -> dict:
    """The fp16 graph against the fp32 graph, both on the target, as the export's fp16 check
    judges them on the CPU."""
    out16, out32 = fp16.outputs(images), fp32.outputs(images)
    report = {"samples": int(len(images)), **variants.compare(out16, out32)}
    if labels is not None:
        report["fp32_top1"] = float((out32[0].argmax(1) == labels).mean())
        report["fp16_top1"] = float((out16[0].argmax(1) == labels).mean())
    report["within_export_tolerances"] = bool(
        report["top1_agreement"] >= tolerances.top1_agreement
        and all(variants.fp16_checks(report, tolerances).values()))
    return report


def measure_model(bench, batches: tuple[int, ...], budget: Budget, threads: int,
                  target: Target = GPU) -> dict:
    """Latency and throughput per batch size: ORT fp32, ORT fp16 (IO binding), PyTorch eager."""
    fp32 = Bound(bench.graphs["fp32"], target, threads)
    fp16 = Bound(variants.to_fp16(bench.graphs["fp32"]), target, threads)
    eager = torch_runner(bench.model, target)
    rng = np.random.default_rng(4)
    rows = {}
    for batch in batches:
        x = rng.standard_normal((batch, *bench.input_shape), dtype=np.float32)
        rows[str(batch)] = measure_interleaved(
            {"ort_fp32": fp32.run_on(x), "ort_fp16": fp16.run_on(x),
             target.torch_label: eager(x)}, budget, batch)
        row = rows[str(batch)]
        log.info("%s %s batch %d: ORT fp32 %.2f ms, fp16 %.2f ms, PyTorch %.2f ms", bench.name,
                 target.name, batch, row["ort_fp32"]["p50_ms"], row["ort_fp16"]["p50_ms"],
                 row[target.torch_label]["p50_ms"])
    if bench.name == "digits":                    # the whole test split, with its labels
        test_set, _ = data.load("digits", "test")
        images, labels = samples.load_images(test_set, np.arange(len(test_set)))
    else:                                          # random weights: agreement is all there is
        images, labels = rng.standard_normal((16, *bench.input_shape), dtype=np.float32), None
    return {"label": bench.label, "provider": fp32.session.get_providers()[0],
            "torch": target.torch_label, "batches": rows,
            "fp16_parity": parity(fp16, fp32, images, labels)}


def gpu_part(benches: dict, batches: tuple[int, ...], budget: Budget, threads: int,
             machine_gpu: dict, target: Target = GPU) -> dict:
    """The GPU part's results, or why it was skipped (never raises: the CPU parts stand)."""
    reason = None
    if target is GPU:
        reason = machine_gpu.get("reason") if not machine_gpu["present"] else unavailable()
    if reason:
        message = f"GPU part skipped: {reason}"
        log.info(message)
        return {"skipped": True, "message": message}
    models = {}
    for name, bench in benches.items():
        try:
            models[name] = measure_model(bench, batches, budget, threads, target)
        except Exception as exc:         # a GPU run that breaks is reported, not fatal
            log.exception("GPU part, %s: failed", name)
            models[name] = {"label": bench.label, "error": f"{type(exc).__name__}: {exc}"}
    devices = machine_gpu.get("devices") or [target.name]
    return {"skipped": False, "device": devices[0], "target": target.name,
            "message": f"GPU part on {devices[0]}", "models": models}
