"""One benchmark run: settings, the parts in order, the targets, and the files written.

    RESULTS/<machine>-<date>-<HHMM>.json    every number, the machine, versions, settings, load average
    RESULTS/<machine>-<date>-<HHMM>.md      the tables and the targets, met or missed
    RESULTS/<machine>-<date>-<HHMM>-*.png   plots
    README.md, between its bench markers    the newest tables (benchmarks.readme), after a full run
                                            into benchmarks/results
"""

import datetime
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import machine
from benchmarks.timing import Budget

log = logging.getLogger("benchmarks")
ROOT = Path(__file__).resolve().parents[1]
RESULTS, README = ROOT / "benchmarks" / "results", ROOT / "README.md"


@dataclass(frozen=True)
class BenchSettings:
    mode: str
    batches: tuple[int, ...]
    model_budget: Budget             # each (model, runtime, batch) measurement
    diagnostics_batches: tuple[int, ...]
    diagnostics_budget: Budget
    concurrencies: tuple[int, ...]
    load_seconds: float              # per concurrency level
    raw_budget: Budget
    gpu_batches: tuple[int, ...]
    gpu_budget: Budget
    http_requests: int               # per server, in the HTTP layer part
    train_batch: int                 # StepNet-50 / ResNet-50 training batch on the CPU (128 on a GPU)
    train_budget: Budget
    ddp_epochs: int                  # `stepnet train` on digits with 1 and 2 processes
    ddp_images: int

    @classmethod
    def full(cls) -> "BenchSettings":
        return cls("full", (1, 8, 32), Budget(warmup=1, seconds=5.0, min_reps=2, max_reps=40),
                   (1, 8), Budget(warmup=1, seconds=6.0, min_reps=3, max_reps=60),
                   (1, 4, 16, 64), 15.0, Budget(warmup=1, seconds=5.0, min_reps=3, max_reps=60),
                   (1, 8, 32, 128), Budget(warmup=3, seconds=3.0, min_reps=5, max_reps=200), 1000,
                   8, Budget(warmup=1, seconds=8.0, min_reps=3, max_reps=20), 2, 1024)

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls("quick", (1, 8), Budget(warmup=1, seconds=0.2, min_reps=2, max_reps=5),
                   (1,), Budget(warmup=1, seconds=0.2, min_reps=2, max_reps=5),
                   (1, 4), 1.0, Budget(warmup=1, seconds=0.2, min_reps=2, max_reps=5),
                   (1, 2), Budget(warmup=1, seconds=0.2, min_reps=2, max_reps=5), 20,
                   2, Budget(warmup=1, seconds=0.1, min_reps=1, max_reps=1), 1, 128)


# (key, description, model, how to read the figure, limit, higher is better)
TARGETS = (
    ("ort_fp32_vs_torch_b1", "ONNX Runtime fp32 latency / PyTorch eager latency, batch 1",
     "stepnet50", 0.6, False),
    ("int8_vs_fp32_throughput_b8", "int8 throughput / fp32 throughput, batch 8", "stepnet50",
     2.0, True),
    ("int8_top1_agreement", "int8 top-1 agreement with fp32, digits test split", "digits",
     0.99, True),
    ("int8_accuracy_drop_points", "fp32 top-1 minus int8 top-1 (points), digits test split",
     "digits", 0.5, False),
    ("diagnostics_cost_b1", "latency with diagnostics outputs / without - 1, batch 1",
     "stepnet50", 0.05, False),
    ("service_vs_raw_throughput_c1", "service req/s / raw decode + pre-process + session.run "
     "images/s, concurrency 1", "stepnet50", 0.95, True),
    ("service_vs_raw_throughput_c4", "service req/s / raw session.run images/s at the batch the "
     "batcher formed, concurrency 4", "stepnet50", 0.95, True),
    ("service_vs_raw_throughput_c16", "service req/s / raw session.run images/s at the batch the "
     "batcher formed, concurrency 16", "stepnet50", 0.95, True),
    ("service_p50_minus_raw_c1_ms", "service p50 - raw end-to-end p50 (ms), concurrency 1",
     "stepnet50", 3.0, False),
    ("serving_path_c16", "service req/s / raw decode + pre-process + session.run at batch 1 "
     "images/s, concurrency 16", "digits", 1.4, True),
    ("serving_path_c64", "service req/s / raw decode + pre-process + session.run at batch 1 "
     "images/s, concurrency 64", "digits", 1.4, True),
    ("service_5xx_c64", "5xx answers at concurrency 64, default settings", "digits", 0, False),
    ("grpc_vs_rest_v2_stepnet50", "gRPC req/s / REST v2 binary req/s, the lowest over the concurrencies",
     "stepnet50", 1.0, True),
    ("grpc_vs_rest_v2_digits", "gRPC req/s / REST v2 binary req/s, the lowest over the concurrencies",
     "digits", 1.0, True),
    ("train_stepnet50_vs_resnet50", "training images/s, StepNet-50 / torchvision ResNet-50, fp32",
     "stepnet50", 0.85, True),
)


def _figure(key: str, model: str, results: dict) -> float | None:
    try:
        if key == "ort_fp32_vs_torch_b1":
            row = results["model"][model]["batches"]["1"]
            return row["ort_fp32"]["p50_ms"] / row["torch_eager"]["p50_ms"]
        if key == "int8_vs_fp32_throughput_b8":
            row = results["model"][model]["batches"]["8"]
            return row["ort_int8"]["throughput"] / row["ort_fp32"]["throughput"]
        if key == "int8_top1_agreement":
            return results["int8_quality"]["top1_agreement"]
        if key == "int8_accuracy_drop_points":
            return -results["int8_quality"]["accuracy_change_points"]
        if key == "diagnostics_cost_b1":
            return results["diagnostics"][model]["batches"]["1"]["cost"]
        if key.startswith("service_vs_raw_throughput_c"):
            return results["service"][model]["load"][key.rpartition("_c")[2]]["throughput_vs_raw"]
        if key.startswith("serving_path_c"):
            return results["service"][model]["load"][key.rpartition("_c")[2]]["throughput_vs_end_to_end"]
        if key == "service_5xx_c64":
            return results["service"][model]["load"]["64"]["errors_5xx"]
        if key.startswith("grpc_vs_rest_v2"):
            transports = results["service"][model]["transports"]
            return min(grpc["throughput"] / transports["rest_v2_binary"][c]["throughput"]
                       for c, grpc in transports["grpc"].items())
        if key == "service_p50_minus_raw_c1_ms":
            return results["service"][model]["load"]["1"]["p50_minus_raw_p50_ms"]
        if key == "train_stepnet50_vs_resnet50":
            return results["train"]["models"]["fp32"]["stepnet50_vs_resnet50"]
    except (KeyError, TypeError, ValueError):
        return None
    raise ValueError(key)


def targets(results: dict) -> list[dict]:
    rows = []
    for key, what, model, limit, higher in TARGETS:
        value = _figure(key, model, results)
        met = None if value is None else (value >= limit if higher else value <= limit)
        rows.append({"key": key, "what": what, "model": model, "value": value,
                     "limit": f"{'>=' if higher else '<='} {limit}", "met": met})
    return rows


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def wait_for_quiet(limit: float, max_wait_s: float = 1200.0, poll_s: float = 30.0) -> dict:
    """Wait until the 1-minute load average is below `limit` (other work skews the timings)."""
    started = time.monotonic()
    while os.getloadavg()[0] >= limit and time.monotonic() - started < max_wait_s:
        log.info("load average %.2f >= %.2f: waiting", os.getloadavg()[0], limit)
        time.sleep(poll_s)
    return {"limit": limit, "waited_s": round(time.monotonic() - started, 1),
            "reached": os.getloadavg()[0] < limit}


def run(settings: BenchSettings, models: tuple[str, ...], parts: tuple[str, ...], out_dir: Path,
        wait_load: float = 0.0) -> list[Path]:
    """Measure, write the results and return the paths written."""
    from benchmarks import model_level, report

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stepnet bench: %(message)s"))
    for name in ("benchmarks", "export"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        waited = wait_for_quiet(wait_load) if wait_load else None
        threads = machine.cores()
        started, load_start = time.time(), machine.load_average()
        results = {"machine": machine.describe(), "started": datetime.datetime.now().isoformat(
            timespec="seconds"), "settings": {**asdict(settings), "threads": threads,
                                              "models": list(models), "parts": list(parts)},
                   "load_average_start": load_start, "quiet_wait": waited,
                   "model": {}, "diagnostics": {}, "profiles": {}, "service": {}, "http": None,
                   "instances": None, "tracing": None,
                   "train": None, "gpu": None}
        benches = {name: getattr(model_level, name)() for name in models}
        _model_parts(results, benches, settings, parts, threads)
        _serving_parts(results, benches, settings, parts, threads)
        if "train" in parts:
            from benchmarks.training import training_part

            results["train"] = training_part(128 if torch_cuda() else settings.train_batch,
                                             settings.train_budget, settings.ddp_epochs, settings.ddp_images)
        if "gpu" in parts:
            from benchmarks import gpu

            results["gpu"] = gpu.gpu_part(benches, settings.gpu_batches, settings.gpu_budget,
                                          threads, results["machine"]["gpu"])
        results["targets"] = targets(results)
        results["load_average_end"] = machine.load_average()
        results["seconds"] = round(time.time() - started, 1)
        return _write(results, out_dir, report)
    finally:
        for name in ("benchmarks", "export"):
            logging.getLogger(name).removeHandler(handler)


def _model_parts(results: dict, benches: dict, settings: BenchSettings, parts: tuple[str, ...],
                 threads: int) -> None:
    """Model level (with ONNX Runtime's op profile in full mode), the diagnostics cost, int8 quality."""
    from benchmarks import model_level

    for name, bench in benches.items():
        if "model" in parts:
            results["model"][name] = model_level.model_level(bench, settings.batches, settings.model_budget,
                                                             threads)
            if settings.mode == "full":
                results["profiles"][name] = {
                    variant: model_level.profile_ops(proto, bench.input_shape, 8, threads)
                    for variant, proto in bench.graphs.items()}
        if "diagnostics" in parts:
            results["diagnostics"][name] = model_level.diagnostics_cost(
                bench, settings.diagnostics_batches, settings.diagnostics_budget, threads)
    if "model" in parts and "digits" in benches:
        results["int8_quality"] = model_level.int8_quality(benches["digits"])


def _serving_parts(results: dict, benches: dict, settings: BenchSettings, parts: tuple[str, ...],
                   threads: int) -> None:
    """A real `stepnet serve` under load against raw session.run, and the HTTP layer's cost."""
    from benchmarks import service

    if "service" in parts:
        with tempfile.TemporaryDirectory(prefix="stepnet-bench-") as tmp:
            tmp = Path(tmp)
            for name, bench in benches.items():
                version = (service.digits_version(tmp / "repo-digits") if name == "digits"
                           else service.stepnet50_version(tmp / "repo-stepnet50", bench))
                results["service"][name] = service.service_level(
                    name, version, settings.concurrencies, settings.load_seconds, settings.raw_budget,
                    threads, tmp)
    if "instances" in parts or "tracing" in parts:
        from benchmarks import instances

        seconds, rounds = settings.load_seconds / 3, 2 if settings.mode == "full" else 1
        # --quick checks that the parts run: one load level each (a wrk load lasts a whole second)
        concurrencies = settings.concurrencies if settings.mode == "full" else settings.concurrencies[-1:]
        load = (concurrencies, seconds, rounds)
        with tempfile.TemporaryDirectory(prefix="stepnet-bench-") as tmp:
            tmp = Path(tmp)
            versions = {name: service.digits_version(tmp / "repo-digits") if name == "digits"
                        else service.stepnet50_version(tmp / "repo-stepnet50", bench)
                        for name, bench in benches.items()}
            if "instances" in parts:
                results["instances"] = instances.instances_part(versions, threads, *load, tmp)
            if "tracing" in parts:
                digits = versions.get("digits") or service.digits_version(tmp / "repo-digits")
                results["tracing"] = instances.tracing_part(digits, threads, *load, tmp)
    if "http" in parts:
        from benchmarks.http_layer import http_layer

        with tempfile.TemporaryDirectory(prefix="stepnet-bench-") as tmp:
            results["http"] = http_layer(service.digits_version(Path(tmp) / "repo"), settings.http_requests,
                                         Path(tmp))


def _write(results: dict, out_dir: Path, report) -> list[Path]:
    """A new set of files per run (the history is kept), named by machine and start time; after a
    full run into the repository's results folder, README's tables are made again from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.fromisoformat(results["started"])
    stem = f"{machine.slug()}-{started:%Y-%m-%d-%H%M}"
    if results["settings"]["mode"] == "quick":
        stem += "-quick"
    base, taken = stem, 1
    while (out_dir / f"{stem}.json").exists():      # two runs started in the same minute
        taken += 1
        stem = f"{base}-{taken}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    plots = report.plots(results, out_dir, stem)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(report.markdown(results, [p.name for p in plots]))
    written = [json_path, md_path, *plots]
    if results["settings"]["mode"] == "full" and out_dir.resolve() == RESULTS.resolve():
        from benchmarks import readme

        if readme.update(README, RESULTS):
            written.append(README)
    return written
