"""Verification of an exported graph, run at every export (issue 3). Each check becomes a row of
the table the CLI prints and a number in the model's metadata; a failed row fails the export.

1. `onnx.checker.check_model(full_check=True)` and strict shape inference pass, and the inferred
   output shapes are logits [batch, K], step_size [batch, L, 3], nsi [batch, L].
2. ONNX Runtime (CPU) against the checkpoint in PyTorch (the unfolded model) on real inputs, run
   in batches of different sizes (the batch dimension is dynamic): logits and diagnostics within
   `tolerances`, top-1 agreement 100 %, NaN positions of nsi identical.
3. An independent runtime, `onnx.reference.ReferenceEvaluator`, against ONNX Runtime on a few
   inputs: this proves that the ai.stepnet function bodies mean what they say on any runtime.
"""

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator

from export import runtime
from export.compare import max_abs_diff, same_nan
from export.samples import chunks
from export.sizes import MIN_SAMPLES, RECOMMENDED_SAMPLES
from models.net import StepNet
from stepnet.repository import INPUT



@dataclass(frozen=True)
class Tolerances:
    logits: float = 1e-4          # max abs diff, ONNX Runtime vs PyTorch
    diagnostics: float = 1e-4     # step_size and nsi, same
    reference: float = 1e-4       # every output, ReferenceEvaluator vs ONNX Runtime
    top1_agreement: float = 1.0


class VerificationError(Exception):
    """The exported graph does not match the checkpoint: export fails with exit code 1."""

    def __init__(self, report: dict):
        failed = [row[0] for row in table_rows(report) if row[3] is False]
        super().__init__("verification failed: " + ", ".join(failed))
        self.report = report


def _batch_sizes(n: int) -> list[int]:
    """Batch sizes 1, 7 and the rest: the dynamic batch dimension at work."""
    sizes = [s for s in (1, 7) if s < n]
    return sizes + [n - sum(sizes)]


def structure(proto: onnx.ModelProto, classes: int, layers: int) -> dict:
    report: dict[str, object] = {"checker": "passed", "shape_inference": "passed", "output_shapes": None}
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        report["checker"] = str(exc).strip().splitlines()[0]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        report["shape_inference"] = str(exc).strip().splitlines()[0]
        return report
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
              for o in inferred.graph.output}
    report["output_shapes"] = shapes
    batch = inferred.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    expected = {"logits": [batch, classes], "step_size": [batch, layers, 3], "nsi": [batch, layers]}
    if not batch or shapes != expected:
        report["shape_inference"] = f"output shapes {shapes}, expected {expected}"
    return report


def verify(proto: onnx.ModelProto, model: StepNet, images: np.ndarray, reference_samples: int = 2,
           tolerances: Tolerances = Tolerances(), min_samples: int = MIN_SAMPLES) -> dict:
    """The verification report of `proto` against `model` on `images` [N, C, H, W], N at least
    `min_samples` (the report records that floor; one without it was made with a floor of 64)."""
    if len(images) < min_samples:
        raise ValueError(f"verification needs at least {min_samples} inputs, got {len(images)}")
    report = structure(proto, model.cfg.num_classes, len(model.layers()))
    report["tolerances"] = asdict(tolerances)
    report["min_samples"] = min_samples
    try:
        report.update(_parity(proto, model, images, reference_samples))
    except Exception as exc:   # a graph a runtime cannot run fails verification, it is no crash
        report["runtime_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    report["passed"] = all(row[3] is not False for row in table_rows(report))
    return report


def _parity(proto: onnx.ModelProto, model: StepNet, images: np.ndarray,
            reference_samples: int) -> dict:
    batches = _batch_sizes(len(images))
    ort_out = runtime.run(runtime.cpu_session(proto), images, batches)
    with torch.no_grad():
        parts = [model.eval()(torch.from_numpy(images[part]), diagnostics=True)
                 for part in chunks(len(images), 32)]
    torch_out = [torch.cat(outputs).numpy() for outputs in zip(*parts)]
    logits, step_size, nsi = (max_abs_diff(o, t) for o, t in zip(ort_out, torch_out))
    few = images[:reference_samples]
    reference = [np.asarray(r) for r in ReferenceEvaluator(proto).run(None, {INPUT: few})]
    return {
        "samples": len(images), "batch_sizes": batches,
        "logits_max_abs_diff": logits,
        "top1_agreement": float(np.mean(ort_out[0].argmax(1) == torch_out[0].argmax(1))),
        "step_size_max_abs_diff": step_size,
        "nsi_max_abs_diff": nsi,
        "nan_positions_identical": all(same_nan(o, t) for o, t in zip(ort_out, torch_out)),
        "reference_samples": len(few),
        "reference_max_abs_diff": max(max_abs_diff(r, o[:len(few)]) for r, o in zip(reference, ort_out)),
        "reference_nan_positions_identical": all(same_nan(r, o[:len(few)]) for r, o in zip(reference, ort_out)),
    }


def table_rows(report: dict) -> list[tuple[str, str, str, bool | None]]:
    """(check, value, limit, passed) rows; passed is None for rows that only inform."""
    tol = report["tolerances"]
    rows = [("onnx checker (full_check)", report["checker"], "", report["checker"] == "passed"),
            ("shape inference", report["shape_inference"], "",
             report["shape_inference"] == "passed")]
    if "runtime_error" in report:
        return rows + [("onnxruntime and reference evaluator", report["runtime_error"], "", False)]
    pct = f"{100 * report['top1_agreement']:.2f}%"
    floor = report.get("min_samples", RECOMMENDED_SAMPLES)
    rows += [
        ("onnxruntime vs pytorch: inputs", f"{report['samples']} in batches of "
         + ", ".join(map(str, report["batch_sizes"])), f">= {floor}", report["samples"] >= floor),
        ("  logits max abs diff", f"{report['logits_max_abs_diff']:.2e}", f"{tol['logits']:.0e}",
         report["logits_max_abs_diff"] <= tol["logits"]),
        ("  top-1 agreement", pct, f"{100 * tol['top1_agreement']:.0f}%",
         report["top1_agreement"] >= tol["top1_agreement"]),
        ("  step_size max abs diff", f"{report['step_size_max_abs_diff']:.2e}",
         f"{tol['diagnostics']:.0e}", report["step_size_max_abs_diff"] <= tol["diagnostics"]),
        ("  nsi max abs diff", f"{report['nsi_max_abs_diff']:.2e}", f"{tol['diagnostics']:.0e}",
         report["nsi_max_abs_diff"] <= tol["diagnostics"]),
        ("  NaN positions identical", "yes" if report["nan_positions_identical"] else "no",
         "yes", report["nan_positions_identical"]),
        ("reference evaluator vs onnxruntime: inputs", str(report["reference_samples"]), "", None),
        ("  max abs diff, all outputs", f"{report['reference_max_abs_diff']:.2e}",
         f"{tol['reference']:.0e}", report["reference_max_abs_diff"] <= tol["reference"]),
        ("  NaN positions identical",
         "yes" if report["reference_nan_positions_identical"] else "no", "yes",
         report["reference_nan_positions_identical"]),
    ]
    return rows


def format_table(report: dict) -> str:
    rows = [("check", "value", "limit", "result")]
    rows += [(c, v, lim, "" if ok is None else "ok" if ok else "FAILED")
             for c, v, lim, ok in table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{c:<{widths[0]}}  {v:<{widths[1]}}  {lim:<{widths[2]}}  {res}".rstrip()
                     for c, v, lim, res in rows)
