"""The export form of a model: the same function with BatchNorm folded away and fused steps.

Pre-activation blocks put each BatchNorm before a ReLU (docs/design.md 1.4, models/net.py):

- bn2 (and bn3 in bottlenecks) follow a convolution directly, and the ImageNet-style stem's BN
  follows the stem convolution: each folds into that convolution's weights and bias.
- bn1 of every branch, and the final `bn`, follow an Add (the previous Euler step), so there is no
  convolution to fold into, and a ReLU sits between them and the next convolution. They become a
  per-channel affine `x * scale + shift` (ONNX Mul and Add with [C, 1, 1] constants).

Nothing is left for ONNX BatchNormalization; graph.py checks that.
"""

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from export.steps import FusedStep
from models.net import StepNet


class ChannelAffine(nn.Module):
    """An inference-mode BatchNorm2d as y = x * scale + shift, per channel."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        assert bn.running_var is not None and bn.running_mean is not None, "BatchNorm2d without running statistics"
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() - bn.running_mean * scale
        self.register_buffer("scale", scale.reshape(-1, 1, 1).clone())   # (C, 1, 1)
        self.register_buffer("shift", shift.reshape(-1, 1, 1).clone())

    def forward(self, x):
        return x * self.scale + self.shift


def export_form(model: StepNet) -> StepNet:
    """A folded copy of `model` (which is left untouched), in eval mode."""
    form: Any = copy.deepcopy(model).eval()    # Any: modules are replaced by ones of other types
    if form.cfg.imagenet_style:
        form.stem[0] = fuse_conv_bn_eval(form.stem[0], form.stem[1])
        form.stem[1] = nn.Identity()
    for stage in form.stages:
        for block in stage:
            branch = block.branch
            branch.bn1 = ChannelAffine(branch.bn1)
            branch.conv1 = fuse_conv_bn_eval(branch.conv1, branch.bn2)
            branch.bn2 = nn.Identity()
            if hasattr(branch, "bn3"):                 # a bottleneck: bn3 follows conv2
                branch.conv2 = fuse_conv_bn_eval(branch.conv2, branch.bn3)
                branch.bn3 = nn.Identity()
            block.step = FusedStep(block)
    form.bn = ChannelAffine(form.bn)
    return form
