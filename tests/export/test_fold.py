"""BatchNorm folding and fused steps, in PyTorch: the export form computes what the model does."""

import pytest
import torch
from torch import nn

from export.fold import ChannelAffine, export_form
from export.steps import FusedStep
from models.net import build


def _randomize_norms(model):
    gen = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
    return model.eval()


@pytest.mark.parametrize("family,depth,size", [
    ("resnet", 20, 32), ("se", 20, 32), ("stepnet", 20, 32),
    ("stepnet", 18, 64), ("se", 50, 64)])
def test_export_form_matches_the_model(family, depth, size):
    torch.manual_seed(0)
    model = _randomize_norms(build(family, depth, 10, size, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    form = export_form(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected, got = model(x, diagnostics=True), form(x, diagnostics=True)
    for e, g in zip(expected, got):
        assert torch.equal(torch.isnan(e), torch.isnan(g))
        torch.testing.assert_close(g.nan_to_num(), e.nan_to_num(), atol=2e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in form.modules())
    steps = [m for m in form.modules() if isinstance(m, FusedStep)]
    assert len(steps) == len(model.layers())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # untouched


def test_channel_affine_is_the_inference_batch_norm():
    bn = _randomize_norms(nn.BatchNorm2d(5))
    x = torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ChannelAffine(bn)(x), bn(x))
