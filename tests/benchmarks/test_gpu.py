"""The GPU part of `stepnet bench`. CI has no GPU, so its code runs here on the CPU stand-in
(ONNX Runtime's CPU provider, PyTorch float32): everything but CUDA itself; on a machine without
a usable GPU the part says why it skipped instead of failing the run."""

import onnx
import pytest

from benchmarks import gpu, report
from benchmarks.model_level import DIGITS_CHECKPOINT, DIGITS_VERSION, BenchModel
from benchmarks.timing import Budget
from models import checkpoint
from service.core.errors import ModelLoadError
from stepnet.repository import MODEL_FILE

pytestmark = pytest.mark.timeout(300)
QUICK = Budget(warmup=1, seconds=0.1, min_reps=2, max_reps=3)


@pytest.fixture(scope="module")
def digits_bench():
    model, _, _ = checkpoint.load(DIGITS_CHECKPOINT)
    proto = onnx.load(str(DIGITS_VERSION / MODEL_FILE))
    return BenchModel("digits", "default model", model, {"fp32": proto})


def test_gpu_part_code_runs_on_the_cpu_stand_in(digits_bench):
    part = gpu.gpu_part({"digits": digits_bench}, (1, 3), QUICK, 2,
                        {"present": True, "devices": ["CPU stand-in"]}, target=gpu.CPU_CHECK)
    assert part["skipped"] is False and part["device"] == "CPU stand-in"
    result = part["models"]["digits"]
    assert "error" not in result, result.get("error")
    assert result["provider"] == "CPUExecutionProvider" and result["torch"] == "torch_fp32"
    assert list(result["batches"]) == ["1", "3"]
    for row in result["batches"].values():
        for key in ("ort_fp32", "ort_fp16", "torch_fp32"):
            assert row[key]["p50_ms"] > 0 and row[key]["reps"] >= 2
    parity = result["fp16_parity"]
    assert parity["samples"] == 360                       # the whole digits test split
    assert parity["top1_agreement"] >= 0.99 and parity["within_export_tolerances"] is True
    assert abs(parity["fp16_top1"] - parity["fp32_top1"]) <= 0.005
    markdown = "\n".join(report._gpu(part))
    assert "ORT fp16 p50 ms" in markdown and "PyTorch fp32 channels_last p50 ms" in markdown
    assert "within the export's fp16 tolerances: yes" in markdown


def test_gpu_part_says_why_it_skips():
    part = gpu.gpu_part({}, (1,), QUICK, 2, {"present": False, "reason": "no nvidia-smi"})
    assert part == {"skipped": True, "message": "GPU part skipped: no nvidia-smi"}
    if gpu.unavailable():                                  # nvidia-smi sees a GPU, CUDA does not
        part = gpu.gpu_part({}, (1,), QUICK, 2, {"present": True, "devices": ["some GPU"]})
        assert part["skipped"] is True and gpu.unavailable() in part["message"]


@pytest.mark.skipif(not gpu.unavailable(), reason="a usable GPU is present")
def test_no_silent_cpu_fallback_when_measuring_the_gpu(digits_bench):
    """A CUDA provider that does not load is an error for the benchmark, not a CPU figure
    labelled GPU."""
    with pytest.raises(ModelLoadError, match="CUDA provider did not load|cannot load"):
        gpu.Bound(digits_bench.graphs["fp32"], gpu.GPU, 2)
