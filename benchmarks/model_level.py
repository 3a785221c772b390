"""Model level: the benchmark models, PyTorch eager vs ONNX Runtime fp32 / int8 per batch size,
the cost of the diagnostics outputs, and where ONNX Runtime spends its time (its profiler).

Both runtimes compute the same outputs: PyTorch runs `model(x, diagnostics=True)` (logits, step
sizes and NSI), as the exported graph does. ONNX Runtime sessions are made exactly as the service
makes them (service.inference.sessions.Session: all graph optimizations, one intra-op thread per core,
no spinning), so the model-level figures are the service's inference figures.
"""

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass

from benchmarks.timing import Budget, measure, measure_interleaved
from export import graph, runtime, samples, variants
from models import checkpoint, data
from models.net import StepNet, build
from service.inference.placement import Device
from service.inference.sessions import Session, session_options
from stepnet.repository import INPUT, MODEL_FILE, OUTPUTS

log = logging.getLogger(__name__)
CPU = Device("cpu", "benchmark")
DIGITS_CHECKPOINT = Path("checkpoints/stepnet-digits")
DIGITS_VERSION = Path("model_repository/stepnet-digits/1")


@dataclass
class BenchModel:
    name: str                      # "stepnet50" | "digits"
    label: str
    model: StepNet                 # PyTorch, eval mode
    graphs: dict[str, onnx.ModelProto] = field(default_factory=dict)   # fp32, int8
    int8_calibration: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        cfg = self.model.cfg
        return cfg.in_channels, cfg.input_size, cfg.input_size


def stepnet50() -> BenchModel:
    """StepNet-50 at 224x224, random weights (timing only), through the export's graph builder;
    int8 calibrated on random inputs (its accuracy means nothing, its speed does)."""
    torch.manual_seed(0)
    model = build("stepnet", 50, 1000, 224, 3).eval()
    log.info("building the StepNet-50 graph (export pipeline's builder)")
    proto = graph.build_onnx(model)
    images = np.random.default_rng(0).standard_normal((8, 3, 224, 224), dtype=np.float32)
    log.info("quantizing StepNet-50 to int8")
    int8 = variants.to_int8(proto, [images[:4], images[4:]])
    return BenchModel("stepnet50", "StepNet-50, 224x224, random weights", model,
                      {"fp32": proto, "int8": int8}, "8 random inputs (timing only)")


def digits(calibration_images: int = variants.INT8_CALIBRATION_SAMPLES) -> BenchModel:
    """The default model: its checkpoint, its exported model.onnx, and an int8 variant
    calibrated on the training split as `stepnet export --int8` does."""
    model, info, _ = checkpoint.load(DIGITS_CHECKPOINT)
    proto = onnx.load(str(DIGITS_VERSION / MODEL_FILE))
    train_set, _ = data.load("digits", "train")
    indices = samples.evenly_spaced(len(train_set), calibration_images)
    batches = [images for images, _ in samples.batches(train_set, indices)]
    log.info("quantizing the digits model to int8")
    return BenchModel("digits", f"default model: stepnet-{model.cfg.depth}, digits "
                                f"{info.input_size}x{info.input_size}", model,
                      {"fp32": proto, "int8": variants.to_int8(proto, batches)},
                      f"{len(indices)} digits training images")


def session(proto: onnx.ModelProto, threads: int, outputs=OUTPUTS) -> Session:
    return Session(proto.SerializeToString(), CPU, None, threads, outputs, "benchmark")


def without_diagnostics(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(with, without): the graph with its step functions inlined (as ONNX Runtime inlines them
    at load), once with all outputs and once with logits only and every node that only fed the
    diagnostics removed."""
    inlined = onnx.inliner.inline_local_functions(proto)
    pruned = ir.serde.deserialize_model(inlined)
    keep = [v for v in pruned.graph.outputs if v.name == "logits"]
    pruned.graph.outputs.clear()
    pruned.graph.outputs.extend(keep)
    RemoveUnusedNodesPass()(pruned)
    return inlined, ir.serde.serialize_model(pruned)


def torch_threads(bench: BenchModel, threads: int) -> dict:
    """PyTorch's thread count for this run: the faster of 1 and `threads` at batch 1. OpenMP's
    barriers make PyTorch collapse when another process holds one of the cores (on 2 shared
    cores we measured 650 ms instead of 6 ms per digits image), and the baseline should be
    PyTorch at its best."""
    x = torch.zeros((1, *bench.input_shape))
    probe = {}
    with torch.inference_mode():
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            probe[n] = measure(lambda: bench.model(x, diagnostics=True),
                               Budget(warmup=1, seconds=0.0, min_reps=3, max_reps=3))["p50_ms"]
    chosen = min(probe, key=probe.get)
    torch.set_num_threads(chosen)
    return {"chosen": chosen, "probe_p50_ms_batch1": {str(n): v for n, v in probe.items()}}


def model_level(bench: BenchModel, batches: tuple[int, ...], budget: Budget, threads: int) -> dict:
    """Per batch size: PyTorch eager, ONNX Runtime fp32 and int8; latency and throughput."""
    chosen = torch_threads(bench, threads)
    sessions = {name: session(proto, threads) for name, proto in bench.graphs.items()}
    rng = np.random.default_rng(1)
    rows = {}
    for batch in batches:
        x = rng.standard_normal((batch, *bench.input_shape), dtype=np.float32)
        xt = torch.from_numpy(x)
        runs = {"torch_eager": lambda: bench.model(xt, diagnostics=True),
                **{f"ort_{name}": (lambda s=s: s.run(x)) for name, s in sessions.items()}}
        with torch.inference_mode():     # interleaved: the machine's load hits all alike
            row = measure_interleaved(runs, budget, batch)
        log.info("%s batch %d: %s", bench.name, batch,
                 ", ".join(f"{k} {v['p50_ms']:.1f} ms" for k, v in row.items()))
        rows[str(batch)] = row
    return {"label": bench.label, "int8_calibration": bench.int8_calibration,
            "torch_threads": chosen,
            "fp16": "not measured: fp16 is the GPU variant (ONNX Runtime's CPU provider runs it "
                    "through casts to float32)", "batches": rows}


def diagnostics_cost(bench: BenchModel, batches: tuple[int, ...], budget: Budget,
                     threads: int) -> dict:
    """The same graph with and without the step_size / nsi outputs, interleaved repetitions."""
    full, logits_only = without_diagnostics(bench.graphs["fp32"])
    sessions = {"with": session(full, threads), "without": session(logits_only, threads, ["logits"])}
    nodes = {"with": len(full.graph.node), "without": len(logits_only.graph.node)}
    rng = np.random.default_rng(2)
    rows = {}
    for batch in batches:
        x = rng.standard_normal((batch, *bench.input_shape), dtype=np.float32)
        timed = measure_interleaved({k: (lambda s=s: s.run(x)) for k, s in sessions.items()},
                                    budget, batch)
        timed["cost"] = timed["with"]["p50_ms"] / timed["without"]["p50_ms"] - 1
        log.info("%s batch %d: diagnostics cost %+.1f%%", bench.name, batch, 100 * timed["cost"])
        rows[str(batch)] = timed
    return {"nodes_inlined": nodes, "batches": rows}


def int8_quality(bench: BenchModel) -> dict:
    """The default model's int8 variant against fp32 on the whole digits test split."""
    test_set, _ = data.load("digits", "test")
    indices = np.arange(len(test_set))
    fp32 = samples.run_graph(runtime.cpu_session(bench.graphs["fp32"]), test_set, indices)
    int8 = samples.run_graph(runtime.cpu_session(bench.graphs["int8"]), test_set, indices)
    labels = fp32[3]
    acc32 = float((fp32[0].argmax(1) == labels).mean())
    acc8 = float((int8[0].argmax(1) == labels).mean())
    return {"dataset": "digits", "split": "test", "samples": int(len(labels)),
            "calibration": bench.int8_calibration, "fp32_top1": acc32, "int8_top1": acc8,
            "accuracy_change_points": 100 * (acc8 - acc32),
            "top1_agreement": float((fp32[0].argmax(1) == int8[0].argmax(1)).mean())}


def profile_ops(proto: onnx.ModelProto, input_shape: tuple[int, ...], batch: int, threads: int,
                runs: int = 2, top: int = 10) -> dict:
    """ONNX Runtime's profiler: kernel time per op type over `runs` runs after one warm-up."""
    with tempfile.TemporaryDirectory(prefix="stepnet-profile-") as tmp:
        options = session_options(threads)     # as the service makes its CPU sessions
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        s = ort.InferenceSession(proto.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        x = np.random.default_rng(3).standard_normal((batch, *input_shape), dtype=np.float32)
        for _ in range(runs + 1):
            s.run(None, {INPUT: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    model_runs = sorted((e["ts"], e["dur"]) for e in events
                        if e.get("cat") == "Session" and e["name"] == "model_run")
    warm_end = model_runs[0][0] + model_runs[0][1]     # the first run is the warm-up
    per_op = Counter()
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] >= warm_end):
            per_op[event["args"]["op_name"]] += event["dur"]
    timed = [dur for _, dur in model_runs[1:]]
    total = sum(per_op.values())
    return {"batch": batch, "runs": len(timed), "run_ms": float(np.median(timed)) / 1e3,
            "ops": [{"op": op, "share": us / total} for op, us in per_op.most_common(top)]}
