"""The exported graph (docs/design.md 1.4): one ai.stepnet node per residual block for every family,
function bodies of standard operators only, no BatchNorm, outputs with a dynamic batch, and the
same numbers as PyTorch on ONNX Runtime and on onnx.reference."""

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from export import graph, runtime
from models import checkpoint
from models.net import build

pytestmark = pytest.mark.timeout(900)     # the first use of a family exports it: 20-100 s
ADAPTOR = {"resnet": "Constant", "se": "SqueezeExcitation", "stepnet": "StiffnessAware"}


def _graph(exports, family):
    proto = exports.built_graph(family)
    model, _, _ = checkpoint.load(exports.checkpoint(family))
    return proto, model


def test_one_step_node_per_block_named_after_its_layer(exports, family):
    proto, model = _graph(exports, family)
    layers = model.layers()
    steps = [n for n in proto.graph.node if n.domain == "ai.stepnet"]
    assert len(steps) == len(layers) == 9
    assert [n.name for n in steps] == [row["name"] for row in layers]
    for node, row in zip(steps, layers):
        first = "First" if row["block"] == 1 else ""
        assert node.op_type == f"{ADAPTOR[family]}{first}Step"
        weights = 0 if family == "resnet" else 4
        assert len(node.input) == (2 if first else 4) + weights
        assert len(node.output) == 3


def test_functions_use_standard_operators_only(exports, family):
    proto, _ = _graph(exports, family)
    used = {n.op_type for n in proto.graph.node if n.domain == "ai.stepnet"}
    assert {f.name for f in proto.functions} == used
    for function in proto.functions:
        assert function.domain == "ai.stepnet"
        assert {n.domain for n in function.node} == {""}
        assert all(onnx.defs.has(n.op_type) for n in function.node)
        assert [(o.domain, o.version) for o in function.opset_import] == [("", graph.OPSET)]
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", graph.OPSET), ("ai.stepnet", 1)}


def test_no_batch_normalization_left(exports, family):
    proto, _ = _graph(exports, family)
    ops = [n.op_type for n in proto.graph.node]
    ops += [n.op_type for f in proto.functions for n in f.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 19 + 2            # stem, 2 per block, 2 projection shortcuts


def test_declared_inputs_and_outputs(exports, family):
    proto, _ = _graph(exports, family)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (inp,) = proto.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = dims(inp)[0]
    assert isinstance(batch, str) and dims(inp)[1:] == [1, 32, 32]
    assert {o.name: dims(o) for o in proto.graph.output} == {
        "logits": [batch, 10], "step_size": [batch, 9, 3], "nsi": [batch, 9]}


@pytest.mark.parametrize("batch", [1, 5])
def test_outputs_at_any_batch_size(exports, family, batch, digits_images):
    proto, model = _graph(exports, family)
    images, _ = digits_images(batch)
    logits, step_size, nsi = runtime.run(runtime.cpu_session(proto), images, batch)
    assert logits.shape == (batch, 10) and step_size.shape == (batch, 9, 3)
    assert nsi.shape == (batch, 9)
    defined = np.array([row["nsi_defined"] for row in model.layers()])
    assert np.isnan(nsi[:, ~defined]).all() and (nsi[:, defined] > 0).all()
    mean, low, high = step_size[..., 0], step_size[..., 1], step_size[..., 2]
    assert (low <= mean + 1e-6).all() and (mean <= high + 1e-6).all()
    if family == "resnet":
        assert (step_size == 1).all()              # h = 1: the plain Euler step
    else:
        assert ((low > 0) & (high < 1)).all()      # a sigmoid gate


def test_onnxruntime_matches_pytorch_on_real_digits(exports, family, digits_images):
    proto, model = _graph(exports, family)
    images, _ = digits_images(64)
    got = runtime.run(runtime.cpu_session(proto), images, 64)
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(images), diagnostics=True)]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
        np.testing.assert_allclose(np.nan_to_num(g), np.nan_to_num(e), rtol=0, atol=1e-4)
    assert (got[0].argmax(1) == expected[0].argmax(1)).all()


def test_reference_evaluator_matches_onnxruntime(exports, family, digits_images):
    proto, _ = _graph(exports, family)
    images, _ = digits_images(64)
    few = images[:2]
    expected = runtime.run(runtime.cpu_session(proto), few, 2)
    got = ReferenceEvaluator(proto).run(None, {"input": few})
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
        np.testing.assert_allclose(np.nan_to_num(g), np.nan_to_num(e), rtol=0, atol=1e-4)


def test_imagenet_style_stem_and_bottleneck_blocks_fold_and_fuse():
    """ImageNet layout: BN-folded 7x7 stem, max pool, bottleneck blocks, four stages."""
    torch.manual_seed(0)
    model = build("stepnet", 50, 5, input_size=64, in_channels=3).eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 1.5)
            bn.running_mean.uniform_(-0.2, 0.2)
    proto = graph.build_onnx(model)
    steps = [n for n in proto.graph.node if n.domain == "ai.stepnet"]
    assert [n.name for n in steps] == [row["name"] for row in model.layers()]
    assert len(steps) == 16
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    x = torch.randn(3, 3, 64, 64)
    got = runtime.run(runtime.cpu_session(proto), x.numpy(), [1, 2])
    with torch.no_grad():
        expected = [t.numpy() for t in model(x, diagnostics=True)]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
        np.testing.assert_allclose(np.nan_to_num(g), np.nan_to_num(e), rtol=1e-4, atol=1e-4)


def test_op_types_are_fixed_and_match_the_committed_default_model():
    """The op types are a public interface (graph tools show them): spelled out, not derived from
    class names, and the graph built from the default checkpoint has those of the committed file."""
    from pathlib import Path

    from export import steps

    assert sorted(k.op_type for k in steps.KINDS) == sorted(
        f"{a}{s}" for a in ("Constant", "SqueezeExcitation", "StiffnessAware") for s in ("Step", "FirstStep"))
    root = Path(__file__).resolve().parents[2]
    committed = onnx.load(str(root / "model_repository" / "stepnet-digits" / "1" / "model.onnx"))
    model, _, _ = checkpoint.load(root / "checkpoints" / "stepnet-digits")
    built = graph.build_onnx(model)
    ops = lambda proto: [(n.domain, n.op_type, n.name) for n in proto.graph.node if n.domain == "ai.stepnet"]
    assert ops(built) == ops(committed)
    assert ops(committed)[:2] == [("ai.stepnet", "StiffnessAwareFirstStep", "stage1.block1"),
                                  ("ai.stepnet", "StiffnessAwareStep", "stage1.block2")]
    assert [f.name for f in built.functions] == [f.name for f in committed.functions]
