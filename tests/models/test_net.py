"""The networks: shapes for every family and depth, the docs/design.md 1.1 formulas, the adaptors."""

import numpy as np
import pytest
import torch

from models.net import CIFAR_DEPTHS, FAMILIES, IMAGENET_DEPTHS, Step, build


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", sorted(CIFAR_DEPTHS))
def test_cifar_shapes(family, depth):
    kind, n = CIFAR_DEPTHS[depth]
    model = build(family, depth, num_classes=10, input_size=32).eval()
    with torch.no_grad():
        logits, step_size, nsi = model(torch.randn(2, 3, 32, 32), diagnostics=True)
    layers = model.layers()
    assert len(layers) == 3 * n
    assert logits.shape == (2, 10)
    assert step_size.shape == (2, 3 * n, 3)
    assert nsi.shape == (2, 3 * n)
    assert [row["channels"] for row in layers[::n]] == [w * (4 if kind == "bottleneck" else 1)
                                                        for w in (16, 32, 64)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", sorted(IMAGENET_DEPTHS))
def test_imagenet_shapes(family, depth):
    counts = IMAGENET_DEPTHS[depth][1]
    model = build(family, depth, num_classes=7, input_size=224).eval()
    with torch.no_grad():
        logits, step_size, nsi = model(torch.randn(1, 3, 224, 224), diagnostics=True)
    assert logits.shape == (1, 7)
    assert step_size.shape == (1, sum(counts), 3)
    assert nsi.shape == (1, sum(counts))
    assert model.layers()[-1]["name"] == f"stage4.block{counts[-1]}"


def test_layer_table_marks_first_blocks():
    model = build("stepnet", 20, 10)
    names = [row["name"] for row in model.layers()]
    assert names[:4] == ["stage1.block1", "stage1.block2", "stage1.block3", "stage2.block1"]
    assert [row["nsi_defined"] for row in model.layers()] == [False, True, True] * 3


def _record_steps(model):
    """Forward hooks on every step: the (x_t, f_t) each one received, in network order."""
    records = []
    hooks = [m.register_forward_hook(lambda mod, args, out: records.append((args[0], args[1], out)))
             for m in model.modules() if isinstance(m, Step)]
    return records, hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_nsi_matches_direct_computation(family):
    torch.manual_seed(0)
    model = build(family, 20, 10, in_channels=1).eval()
    records, hooks = _record_steps(model)
    with torch.no_grad():
        _, step_size, nsi = model(torch.randn(4, 1, 32, 32), diagnostics=True)
    for h in hooks:
        h.remove()
    assert len(records) == len(model.layers())
    for t, row in enumerate(model.layers()):
        if not row["nsi_defined"]:
            assert torch.isnan(nsi[:, t]).all()
            continue
        x, f = records[t][0].double().numpy(), records[t][1].double().numpy()
        x_prev, f_prev = records[t - 1][0].double().numpy(), records[t - 1][1].double().numpy()
        for b in range(4):
            expected = np.linalg.norm(f[b] - f_prev[b]) / (np.linalg.norm(x[b] - x_prev[b]) + 1e-6)
            assert nsi[b, t].item() == pytest.approx(expected, rel=1e-4)


def test_stepnet_adaptor_reads_channel_stiffness():
    """s_{t,c} of docs/design.md 1.1, recomputed per channel, is what the stepnet adaptor receives."""
    torch.manual_seed(0)
    model = build("stepnet", 20, 10, in_channels=1).eval()
    seen = []
    adaptor = model.stages[0][1].step.adaptor
    handle = adaptor.register_forward_hook(lambda mod, args, out: seen.append((args[1], out)))
    records, hooks = _record_steps(model)
    with torch.no_grad():
        model(torch.randn(3, 1, 32, 32), diagnostics=True)
    handle.remove()
    for h in hooks:
        h.remove()
    (x_prev, f_prev, _), (x, f, out) = records[0], records[1]
    s, h = seen[0]
    x, f, x_prev, f_prev = (a.double().numpy() for a in (x, f, x_prev, f_prev))
    num = np.sqrt(((f - f_prev) ** 2).sum(axis=(2, 3)))
    den = np.sqrt(((x - x_prev) ** 2).sum(axis=(2, 3)))
    np.testing.assert_allclose(s.numpy(), num / (den + 1e-6), rtol=1e-4)
    # and the step really is x_next = x + h * f
    np.testing.assert_allclose(out[0].double().numpy(), x + h.double().numpy()[:, :, None, None] * f,
                               rtol=1e-5, atol=1e-5)


def test_first_block_of_stage_gets_zero_stiffness():
    model = build("stepnet", 20, 10).eval()
    seen = []
    handle = model.stages[1][0].step.adaptor.register_forward_hook(lambda m, a, o: seen.append(a[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))


def test_resnet_step_size_is_exactly_one():
    model = build("resnet", 56, 10).eval()
    with torch.no_grad():
        _, step_size, _ = model(torch.randn(3, 3, 32, 32), diagnostics=True)
    assert torch.equal(step_size, torch.ones_like(step_size))


@pytest.mark.parametrize("family", ["se", "stepnet"])
def test_adaptive_step_sizes_lie_in_unit_interval(family):
    model = build(family, 20, 10).eval()
    with torch.no_grad():
        _, step_size, _ = model(torch.randn(3, 3, 32, 32), diagnostics=True)
    mean, low, high = step_size.unbind(-1)
    assert ((low > 0) & (high < 1) & (low <= mean) & (mean <= high)).all()


@pytest.mark.parametrize("family", ["se", "stepnet"])
def test_gradients_reach_every_adaptor(family):
    torch.manual_seed(0)
    model = build(family, 20, 10).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    adaptors = [m.step.adaptor for stage in model.stages for m in stage]
    for adaptor in adaptors:
        grads = [p.grad for p in adaptor.parameters()]
        # every parameter is in the graph; the output bias always gets a gradient (a hidden ReLU
        # unit can be dead for a whole batch at initialisation, so fc1 may get none in one block)
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    if family == "stepnet":   # the stiffness half of fc1's input is differentiable, not detached
        channels = [a.fc1.in_features // 2 for a in adaptors]
        assert any(float(a.fc1.weight.grad[:, c:].abs().sum()) > 0 for a, c in zip(adaptors, channels))


def test_sparse_adaptors_only_where_asked():
    model = build("stepnet", 20, 10, adaptor_blocks=("stage2.block2",)).eval()
    with torch.no_grad():
        _, step_size, _ = model(torch.randn(2, 3, 32, 32), diagnostics=True)
    index = [row["name"] for row in model.layers()].index("stage2.block2")
    others = torch.cat([step_size[:, :index], step_size[:, index + 1:]], dim=1)
    assert torch.equal(others, torch.ones_like(others))
    assert (step_size[:, index] < 1).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"family": "transformer", "depth": 20}, "unknown family"),
    ({"family": "stepnet", "depth": 21}, "unknown depth"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(num_classes=10, **kwargs)


@pytest.mark.parametrize("family", ["resnet", "se", "stepnet"])
def test_training_without_diagnostics_takes_the_same_steps(family):
    """Without diagnostics (training) a block skips NSI and the step statistics, and the stiffness
    estimate where its adaptor does not read it; logits and gradients stay the same."""
    torch.manual_seed(0)
    model = build(family, 20, 10, in_channels=1).train()
    x = torch.randn(4, 1, 32, 32)
    torch.manual_seed(1)
    fast = model(x)
    fast.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    full, _, _ = model(x, diagnostics=True)
    full.sum().backward()
    assert torch.equal(fast, full)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
