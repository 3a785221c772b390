"""The fused adaptive-step operator of docs/design.md 1.4: one `ai.stepnet` node per residual block.

Each block's step `x_next = x + h * f` (with its diagnostics) becomes ONE node whose op type names
the step's kind, e.g. `ai.stepnet::StiffnessAwareStep` or, for the first block of a stage (no
predecessor, so no x_prev / f_prev inputs), `ai.stepnet::StiffnessAwareFirstStep`. The node is
defined by a model-local FunctionProto whose body holds standard ONNX operators only.

How the graph gets there (the issue offers two routes; this is the dynamo one):

1. Every `models.net.Step` of the model is swapped for a `FusedStep` that calls a PyTorch custom
   operator (`torch.ops.stepnet.<kind>`) with the step's tensors in a fixed order: x, f,
   [x_prev, f_prev], then the adaptor's weights in the order its `weights` lists them. The dynamo exporter keeps the
   custom operator opaque, and its translation (below) emits one `ai.stepnet` node for it, with the
   inputs in that order by construction.
2. The function body of each kind is the same step, exported on its own with every dimension
   dynamic (`StepKernel`), so one shape-generic body serves all blocks of a kind, and the body is
   traced from `models.net` and `models.stiffness`: the formulas exist once, in PyTorch.

Why not the TorchScript exporter's `export_modules_as_functions`: that exporter is deprecated in
torch 2.9+ (it warns that the feature will be removed), it names the function domain after the
Python module, orders and names the function's inputs after TorchScript values, and adds spurious
outputs, so its result needs rewriting anyway; and it would tie the project to an exporter torch is
removing. Why not outline the steps from a plain dynamo export afterwards: the node-to-role mapping
(which input is x and which x_prev) would have to be guessed from the graph, and the bodies would
embed each stage's static shapes. The custom operator makes the roles explicit instead.
"""

import functools
from dataclasses import dataclass

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import values as onnxscript_values
from torch import nn

from models import net
from stepnet.repository import STEP_DOMAIN, STEP_DOMAIN_VERSION

OUTPUTS = ("x_next", "step_size", "nsi")
PREV = ("x_prev", "f_prev")
# op_name -> adaptor class; the op types are public (graph tools show them) and spelled out here
ADAPTORS = {cls.op_name: cls for cls in (net.ConstantAdaptor, net.SqueezeExcitationAdaptor,
                                         net.StiffnessAwareAdaptor)}
OP_TYPES = {(adaptor, first): f"{adaptor}{'FirstStep' if first else 'Step'}"
            for adaptor in ADAPTORS for first in (True, False)}
TORCH_NAMES = {"Constant": "constant", "SqueezeExcitation": "squeeze_excitation",
               "StiffnessAware": "stiffness_aware"}


@dataclass(frozen=True)
class StepKind:
    """What a step node needs to know: its adaptor and whether the block has a predecessor."""
    adaptor: str        # an adaptor's op_name, a key of ADAPTORS
    first: bool         # first block of its stage: no x_prev / f_prev, NSI undefined

    @property
    def op_type(self) -> str:
        return OP_TYPES[(self.adaptor, self.first)]

    @property
    def weights(self) -> tuple[tuple[str, str], ...]:
        """(node input, adaptor parameter) pairs, in the node's order."""
        return ADAPTORS[self.adaptor].weights

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("x", "f") + (() if self.first else PREV) + tuple(name for name, _ in self.weights)

    @property
    def torch_name(self) -> str:
        """The custom operator's name, e.g. stepnet::stiffness_aware_first_step."""
        return f"stepnet::{TORCH_NAMES[self.adaptor]}{'_first' if self.first else ''}_step"

    def template(self) -> net.Step:
        """A step module of this kind; its weights are placeholders that StepKernel replaces."""
        adaptor = ADAPTORS[self.adaptor]
        return net.Step(adaptor() if adaptor is net.ConstantAdaptor else adaptor(channels=4, reduction=1))


KINDS = tuple(StepKind(a, first) for a in ADAPTORS for first in (True, False))


def kind_of(block: net.Block) -> StepKind:
    adaptor = type(block.step.adaptor)
    if ADAPTORS.get(getattr(adaptor, "op_name", "")) is not adaptor:
        raise TypeError(f"no fused step for adaptor {adaptor.__name__}")
    return StepKind(adaptor.op_name, block.first)


class StepKernel(nn.Module):
    """A step of one kind as a pure function of its tensors (weights included), in the order of
    `kind.inputs`. It runs the model's own Step code (docs/design.md 1.1-1.2) with the given weights."""

    def __init__(self, kind: StepKind):
        super().__init__()
        self.kind = kind
        self.step = kind.template()

    def forward(self, *tensors):
        named = dict(zip(self.kind.inputs, tensors, strict=True))
        weights = {"adaptor." + parameter: named[name] for name, parameter in self.kind.weights}
        prev = None if self.kind.first else net.Predecessor(named["x_prev"], named["f_prev"])
        return tuple(torch.func.functional_call(self.step, weights, (named["x"], named["f"], prev)))


def _register_custom_op(kind: StepKind):
    schema = "(" + ", ".join(f"Tensor {n}" for n in kind.inputs) + ") -> (Tensor, Tensor, Tensor)"
    kernel = StepKernel(kind)

    def run(*tensors):
        return tuple(kernel(*tensors))

    op = torch.library.custom_op(kind.torch_name, run, mutates_args=(), schema=schema)

    @op.register_fake
    def _(*tensors):
        x = tensors[0]
        return torch.empty_like(x), x.new_empty(x.shape[0], 3), x.new_empty(x.shape[0])

    return op


CUSTOM_OPS = {kind: _register_custom_op(kind) for kind in KINDS}


class FusedStep(nn.Module):
    """Stands in for a block's models.net.Step in the export form: the same step, called through
    the custom operator so that the exporter sees one opaque operation with explicit roles."""

    def __init__(self, block: net.Block):
        super().__init__()
        self.kind = kind_of(block)
        self.adaptor = block.step.adaptor

    def forward(self, x, f, prev: net.Predecessor | None = None, diagnostics: bool = True) -> net.StepOutput:
        weights = tuple(self.adaptor.get_parameter(parameter) for _, parameter in self.kind.weights)
        return net.StepOutput(*CUSTOM_OPS[self.kind](x, f, *(prev or ()), *weights))


def _onnx_op(kind: StepKind):
    schema = OpSchema(
        kind.op_type, STEP_DOMAIN, STEP_DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter(n, "T") for n in kind.inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in OUTPUTS],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")])
    return onnxscript_values.Op(onnxscript_values.Opset(STEP_DOMAIN, STEP_DOMAIN_VERSION), kind.op_type, schema)


def translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...): each custom operator -> one node."""
    table = {}
    for kind in CUSTOM_OPS:
        node = _onnx_op(kind)
        overload = getattr(torch.ops.stepnet, kind.torch_name.split("::")[1]).default
        table[overload] = lambda *tensors, _node=node: _node(*tensors, _outputs=len(OUTPUTS))
    return table


def _example_inputs(kind: StepKind) -> tuple[torch.Tensor, ...]:
    # distinct sizes, none 0 or 1, so that the export treats every dimension as independent
    b, c, h, w, hidden = 2, 6, 5, 7, 3
    gen = torch.Generator().manual_seed(0)
    shapes = {"x": (b, c, h, w), "f": (b, c, h, w), "x_prev": (b, c, h, w), "f_prev": (b, c, h, w),
              "fc1_weight": (hidden, 2 * c if ADAPTORS[kind.adaptor].uses_stiffness else c),
              "fc1_bias": (hidden,), "fc2_weight": (c, hidden), "fc2_bias": (c,)}
    return tuple(torch.randn(shapes[n], generator=gen) for n in kind.inputs)


@functools.cache
def function_proto(kind: StepKind, opset: int) -> onnx.FunctionProto:
    """The model-local function that defines `kind`'s node: the step exported on its own with all
    dimensions dynamic, its constants turned into Constant nodes."""
    example = _example_inputs(kind)
    dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in example)
    program = torch.onnx.export(StepKernel(kind).eval(), example, dynamo=True, opset_version=opset,
                                input_names=list(kind.inputs), output_names=list(OUTPUTS),
                                dynamic_shapes=(dynamic,), verbose=False)   # (*tensors,)
    assert program is not None      # dynamo=True returns the program
    graph = program.model_proto.graph
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    foreign = {n.domain for n in graph.node} - {""}
    if foreign:
        raise RuntimeError(f"the {kind.op_type} body uses non-standard domains {sorted(foreign)}")
    return onnx.helper.make_function(
        STEP_DOMAIN, kind.op_type, list(kind.inputs), list(OUTPUTS), constants + list(graph.node),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        doc_string=f"x_next = x + h * f with its diagnostics (docs/design.md 1.4); adaptor {kind.adaptor}")
