"""Training throughput (`--parts train`): images/s of full SGD steps (forward with autocast,
backward, optimizer step) on synthetic data, so that the data loader is not what is measured.

- StepNet-50 at 224x224 against torchvision's resnet50, same device, precision and batch, steps
  taking turns between the two; StepNet's images/s over ResNet-50's is the figure of interest
  (goal: >= 0.85). StepNet-50 pays for its adaptors and for the stiffness norms (docs/design.md 1.1) in
  every block; ResNet-50 is post-activation with neither.
- The default digits model (StepNet-20, 32x32, batch 64).
- Each in fp32 and bf16 on the CPU (and fp16 on a GPU), channels_last on a GPU.
- DDP: `stepnet train` on digits with 1 process (batch 64) and 2 (batch 32 each, the same global
  batch), images/s of its second epoch as metrics.jsonl reports it (real data loading included).
"""

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import Budget, measure_interleaved
from models.net import build

log = logging.getLogger(__name__)


def _step(model: torch.nn.Module, batch: int, size: int, channels: int, device: torch.device, precision: str):
    """One SGD step on a fixed synthetic batch, as models.train takes it."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, memory_format=fmt)
    y = torch.randint(0, 1000 if size == 224 else 10, (batch,), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()
    return step


def model_throughput(device: torch.device, precisions: tuple[str, ...], batch_224: int, budget: Budget) -> dict:
    from torchvision.models import resnet50

    out = {}
    for precision in precisions:
        torch.manual_seed(0)
        steps = {"stepnet50": _step(build("stepnet", 50, 1000, 224, 3), batch_224, 224, 3, device, precision),
                 "resnet50": _step(resnet50(), batch_224, 224, 3, device, precision)}
        row = measure_interleaved(steps, budget, batch_224)
        row["stepnet50_vs_resnet50"] = row["stepnet50"]["throughput"] / row["resnet50"]["throughput"]
        if device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        digits = measure_interleaved({"digits": _step(build("stepnet", 20, 10, 32, 1), 64, 32, 1, device,
                                                      precision)}, budget, 64)
        row["digits"] = digits["digits"]
        out[precision] = row
        log.info("train %s %s, batch %d: StepNet-50 %.1f img/s, ResNet-50 %.1f img/s (%.2f); digits %.0f img/s",
                 device.type, precision, batch_224, row["stepnet50"]["throughput"], row["resnet50"]["throughput"],
                 row["stepnet50_vs_resnet50"], row["digits"]["throughput"])
    return out


def ddp_throughput(epochs: int, train_images: int) -> dict:
    """`stepnet train` with 1 and with 2 processes (gloo on the CPU) at one global batch of 64."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="stepnet-bench-train-") as tmp:
        for processes, batch in ((1, 64), (2, 32)):
            folder = Path(tmp) / f"p{processes}"
            command = [sys.executable, "-m", "stepnet", "train", "--epochs", str(epochs), "--train-images",
                       str(train_images), "--batch-size", str(batch), "--device", "cpu", "--quiet",
                       "--out", str(folder)]
            if processes > 1:
                command += ["--nproc-per-node", str(processes)]
            subprocess.run(command, check=True, capture_output=True, timeout=1800)
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            out[str(processes)] = {"images_per_s": rows[-1]["images_per_s"],
                                   "data_wait_fraction": rows[-1]["data_wait_fraction"],
                                   "test_accuracy": rows[-1]["test_accuracy"], "global_batch": 64}
            log.info("train digits, %d process(es): %.0f img/s", processes, out[str(processes)]["images_per_s"])
    return out


def training_part(batch_224: int, budget: Budget, ddp_epochs: int, ddp_images: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    return {"device": device.type, "batch_224": batch_224, "threads": torch.get_num_threads(),
            "models": model_throughput(device, precisions, batch_224, budget),
            "ddp_cpu": ddp_throughput(ddp_epochs, ddp_images)}
