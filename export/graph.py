"""Checkpoint model -> ONNX graph: BatchNorm folded (fold.py), one `ai.stepnet` node per residual
block (steps.py), a dynamic batch dimension, and the diagnostics as graph outputs (docs/design.md 1.3-1.4).

    input      [batch, C, H, W] float32
    logits     [batch, K]
    step_size  [batch, L, 3]   mean, min, max over channels of h_t, per block
    nsi        [batch, L]      NaN for the first block of a stage
"""

import ast
import contextlib
import io
import warnings

import onnx
import onnx_ir as ir
import torch
from torch import nn

from export import steps
from export.fold import export_form
from stepnet.repository import INPUT, OUTPUTS, STEP_DOMAIN
from models.net import StepNet

OPSET = 18          # ONNX Runtime 1.31 (and most runtimes since 2023) run opset 18
SCOPE_KEY = "pkg.torch.onnx.name_scopes"


class GraphError(RuntimeError):
    """The exported graph is not what docs/design.md 1.4 promises (a bug, not a user mistake)."""


class _WithDiagnostics(nn.Module):
    def __init__(self, model: StepNet):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, diagnostics=True)


def _quiet_export(*args, **kwargs):
    # the exporter prints progress lines and warns about its own internals; the CLI reports instead
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(*args, **kwargs)


def _layer_of(node: ir.Node, layers: list[dict]) -> str:
    """The layer a step node belongs to, from the module path the exporter records."""
    scopes = ast.literal_eval(node.metadata_props.get(SCOPE_KEY, "[]"))
    for row in layers:
        module = f"stages.{row['stage'] - 1}.{row['block'] - 1}.step"
        if any(scope.endswith("." + module) for scope in scopes):
            return row["name"]
    raise GraphError(f"step node {node.name} carries no layer scope ({scopes})")


def _name_steps(model: ir.Model, layers: list[dict]) -> list[steps.StepKind]:
    """Name each step node and its outputs after its layer; returns the kinds used, in order."""
    nodes = [n for n in model.graph if n.domain == STEP_DOMAIN]
    names = [_layer_of(n, layers) for n in nodes]
    if names != [row["name"] for row in layers]:
        raise GraphError(f"step nodes {names} do not match the layer table")
    kinds = []
    for node, name in zip(nodes, names):
        node.name = name
        for value, suffix in zip(node.outputs, steps.OUTPUTS):
            if not value.is_graph_output():
                value.name = f"{name}.{suffix}"
        kinds.append(next(k for k in steps.KINDS if k.op_type == node.op_type))
    return kinds


def build_onnx(model: StepNet, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX model of `model` (a checkpoint's StepNet; left unchanged), without metadata."""
    cfg = model.cfg
    example = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size,
                          generator=torch.Generator().manual_seed(0))
    program = _quiet_export(
        _WithDiagnostics(export_form(model)).eval(), (example,), dynamo=True, opset_version=opset,
        input_names=[INPUT], output_names=list(OUTPUTS),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        custom_translation_table=steps.translation_table(), verbose=False)
    onnx_model = program.model
    kinds = _name_steps(onnx_model, model.layers())
    for node in onnx_model.graph:
        node.metadata_props.clear()          # exporter stack traces: machine paths, no meaning
    onnx_model.graph.name = f"{cfg.family}-{cfg.depth}"
    proto = ir.serde.serialize_model(onnx_model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        proto.functions.extend(steps.function_proto(k, opset) for k in dict.fromkeys(kinds))
    domains = {n.domain for n in proto.graph.node} | {f.domain for f in proto.functions}
    if domains - {"", STEP_DOMAIN}:
        raise GraphError(f"unexpected operator domains {sorted(domains - {'', STEP_DOMAIN})}")
    left = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if left:
        raise GraphError(f"BatchNormalization left after folding: {left}")
    return proto
