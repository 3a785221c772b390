"""The fp16 and int8 variants of an exported graph (issue 6), written beside model.onnx as
model.fp16.onnx and model.int8.onnx and checked against it before anything is written.

fp16 (for GPUs): onnxconverter-common's float16 conversion. Inputs and outputs stay float32, and
the `ai.stepnet` step nodes stay float32 whole (block list): they hold the adaptor's reductions
(global average pooling, the channel-stiffness and NSI norms), whose sums of squares lose digits
or overflow in fp16. Convolutions, the affine BatchNorm remainders and the classifier run in fp16.
(ONNX Runtime's copy of the converter, onnxruntime.transformers.float16, writes duplicate Cast
outputs when one tensor feeds two blocked nodes, as x_t feeds step t and step t+1 here.)

int8 (for CPUs): ONNX Runtime's static quantization, QDQ format, weights int8 per output channel,
activations uint8 calibrated (min/max) on training images (with int8 activations ONNX Runtime 1.31
leaves 24 of StepNet-50's 53 convolutions unfused). The step nodes stay float; the
convolution that yields a block's residual branch f is quantized at its output too, so that
ONNX Runtime fuses it into a QLinearConv (otherwise it runs as a float Conv on dequantized
weights). Weights use 7 bits (reduce_range): without AVX-512 VNNI the u8 x s8 multiply-add of x86
saturates its 16-bit sums: full 8-bit weights lost 1.7 points of digits accuracy (97.5 %
top-1 agreement) in our measurements.

Both are verified against the fp32 graph with ONNX Runtime on the CPU (which runs fp16 nodes that
have no fp16 CPU kernel through inserted casts): top-1 agreement, accuracy change and output
differences; fp16 also against onnx.reference.ReferenceEvaluator. A variant that fails its limits
fails the export, and nothing is written.
"""

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from export import runtime, samples
from export.compare import max_abs_diff, max_rel_diff, same_nan
from export.verify import structure
from stepnet.repository import INPUT, STEP_DOMAIN

VARIANTS = ("fp16", "int8")
INT8_CALIBRATION_SAMPLES = 512
QUANTIZED_OPS = ("Conv", "Gemm", "Relu")


@dataclass(frozen=True)
class VariantTolerances:
    top1_agreement: float = 0.99        # variant vs fp32 graph, on the accuracy images
    accuracy_drop: float = 0.005        # fp32 top-1 minus variant top-1 (0.5 points)
    fp16_logits: float = 5e-2           # max abs diff vs the fp32 graph
    fp16_step_size: float = 1e-2        # max abs diff (step sizes lie in (0, 1])
    fp16_nsi_relative: float = 1e-2     # max |nsi16 - nsi32| / |nsi32|
    fp16_reference: float = 1e-2        # ReferenceEvaluator vs ONNX Runtime, every output


class VariantError(Exception):
    """A variant does not match the fp32 graph: the export fails with exit code 1."""

    def __init__(self, variant: str, report: dict):
        failed = ", ".join(k for k, ok in report["checks"].items() if not ok)
        super().__init__(f"{variant} variant verification failed: {failed}")
        self.variant, self.report = variant, report


def _tool(package: str) -> str:
    return f"{package} {package_metadata.version(package)}"


def _topological(graph: onnx.GraphProto) -> None:
    """Sort the nodes so that each comes after its inputs' producers (the fp16 converter appends
    the casts of the graph inputs last)."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("the converted graph has a cycle or a dangling input")
        for node in ready:
            known.update(node.output)
        order += ready
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    graph.ClearField("node")
    graph.node.extend(order)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 graph: float32 inputs and outputs, step nodes in float32."""
    from onnxconverter_common import float16

    step_ops = sorted({n.op_type for n in proto.graph.node if n.domain == STEP_DOMAIN})
    with warnings.catch_warnings():   # it warns for each weight below fp16's range: verify() judges
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=float16.DEFAULT_OP_BLOCK_LIST + step_ops)
    _topological(converted.graph)
    return converted


def _feeds_step_branch(quantizer, tensor: str) -> bool:
    return any(n.domain == STEP_DOMAIN and len(n.input) > 1 and n.input[1] == tensor
               for n in quantizer.model.graph().node)


@contextlib.contextmanager
def _quantize_step_branches():
    """ONNX Runtime quantizes a tensor when a quantized node reads it; the step nodes are not
    quantized, so the f they read would stay float and its Conv unfused. This registers a Conv
    quantizer that also quantizes an output read as f by a step node (the registry is the
    quantizer's own extension point; it is restored afterwards)."""
    from onnxruntime.quantization import registry
    from onnxruntime.quantization.operators.conv import QDQConv

    class QDQConvFeedingStep(QDQConv):
        def quantize(self):
            super().quantize()
            if _feeds_step_branch(self.quantizer, self.node.output[0]):
                self.quantizer.quantize_activation_tensor(self.node.output[0])

    saved = registry.QDQRegistry["Conv"]
    registry.QDQRegistry["Conv"] = QDQConvFeedingStep
    try:
        yield
    finally:
        registry.QDQRegistry["Conv"] = saved


@contextlib.contextmanager
def _quiet():
    """The quantizer logs advice (pre-processing, ...) with logging.warning(), which also gives
    the root logger a handler: silence the one and take back the other."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        for handler in root.handlers[len(handlers):]:
            root.removeHandler(handler)


def to_int8(proto: onnx.ModelProto, calibration_batches: Iterable[np.ndarray]) -> onnx.ModelProto:
    """The int8 QDQ graph, its activation ranges calibrated on `calibration_batches` (arrays
    [B, C, H, W], read once)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration_batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory(prefix="stepnet-int8-") as tmp, _quiet(), \
            _quantize_step_branches():
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(source))
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(target))


def settings(variant: str, calibration: dict | None = None) -> dict:
    """How a variant was made, for model.json."""
    if variant == "fp16":
        return {"tool": _tool("onnxconverter-common") + " float16.convert_float_to_float16",
                "keep_io_types": True, "float32_ops": "ai.stepnet step nodes and the tool's "
                                                      "default block list"}
    return {"tool": _tool("onnxruntime-gpu") + " quantization.quantize_static",
            "format": "QDQ", "weights": "int8, per channel, reduce_range (7 bit)",
            "activations": "uint8, min/max calibration", "quantized_ops": list(QUANTIZED_OPS),
            "float_ops": "ai.stepnet step nodes (their input f is quantized)",
            "calibration": calibration}


def compare(outputs: Sequence[np.ndarray], fp32_outputs: Sequence[np.ndarray]) -> dict:
    """How far a variant's (logits, step_size, nsi) lie from the fp32 graph's on the same images."""
    logits, step_size, nsi = outputs[:3]
    return {"top1_agreement": float((logits.argmax(1) == fp32_outputs[0].argmax(1)).mean()),
            "logits_max_abs_diff": max_abs_diff(logits, fp32_outputs[0]),
            "step_size_max_abs_diff": max_abs_diff(step_size, fp32_outputs[1]),
            "nsi_max_rel_diff": max_rel_diff(nsi, fp32_outputs[2])}


def fp16_checks(report: dict, tolerances: VariantTolerances) -> dict[str, bool]:
    """The fp16 limits on what compare() measured."""
    return {"logits_max_abs_diff": report["logits_max_abs_diff"] <= tolerances.fp16_logits,
            "step_size_max_abs_diff": report["step_size_max_abs_diff"] <= tolerances.fp16_step_size,
            "nsi_max_rel_diff": report["nsi_max_rel_diff"] <= tolerances.fp16_nsi_relative}


def verify(variant: str, proto: onnx.ModelProto, fp32_outputs: tuple[np.ndarray, ...],
           dataset, indices: np.ndarray, tolerances: VariantTolerances,
           reference_samples: int = 2) -> dict:
    """The variant's report against the fp32 graph's outputs (logits, step_size, nsi, labels)
    on dataset[indices]; its "passed" says whether every limit holds."""
    classes, layers = fp32_outputs[0].shape[1], fp32_outputs[2].shape[1]
    report = structure(proto, classes, layers)
    *outputs, labels = samples.run_graph(runtime.cpu_session(proto), dataset, indices)
    logits, _, nsi = outputs
    fp32_top1 = float((fp32_outputs[0].argmax(1) == labels).mean())
    top1 = float((logits.argmax(1) == labels).mean())
    report.update({
        "samples": int(len(labels)),
        "top1": top1, "fp32_top1": fp32_top1, "accuracy_change": top1 - fp32_top1,
        **compare(outputs, fp32_outputs),
        "nan_positions_identical": same_nan(nsi, fp32_outputs[2]),
    })
    checks = {"checker": report["checker"] == "passed",
              "shape_inference": report["shape_inference"] == "passed",
              "top1_agreement": report["top1_agreement"] >= tolerances.top1_agreement,
              "accuracy_drop": -report["accuracy_change"] <= tolerances.accuracy_drop,
              "nan_positions_identical": report["nan_positions_identical"]}
    if variant == "fp16":
        few, _ = samples.load_images(dataset, indices[:reference_samples])
        reference = ReferenceEvaluator(proto).run(None, {INPUT: few})
        report["reference_samples"] = len(few)
        report["reference_max_abs_diff"] = max(max_abs_diff(np.asarray(r), o[:len(few)])
                                               for r, o in zip(reference, outputs))
        checks.update({
            **fp16_checks(report, tolerances),
            "reference_max_abs_diff": report["reference_max_abs_diff"] <= tolerances.fp16_reference,
        })
    report["tolerances"] = asdict(tolerances)
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report


def format_report(variant: str, report: dict) -> str:
    """Two lines for the CLI: what was measured and whether it passed."""
    status = "ok" if report["passed"] else "FAILED: " + ", ".join(
        k for k, ok in report["checks"].items() if not ok)
    extra = ""
    if variant == "fp16":
        extra = (f", logits max abs diff {report['logits_max_abs_diff']:.2e}, nsi max rel diff "
                 f"{report['nsi_max_rel_diff']:.2e}")
    return (f"{variant}: top-1 {report['top1']:.4f} (fp32 {report['fp32_top1']:.4f}, change "
            f"{100 * report['accuracy_change']:+.2f} points), top-1 agreement "
            f"{100 * report['top1_agreement']:.2f}% on {report['samples']} test images"
            f"{extra}: {status}")
