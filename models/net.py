"""StepNet and its baselines: one pre-activation ResNet backbone, three step-size adaptors.

A residual network is forward Euler on dx/dt = f(x, t) (docs/design.md 1):

    resnet    x_next = x + 1   * f
    se        x_next = x + h(f) * f
    stepnet   x_next = x + h(f, s) * f        s: channel stiffness of docs/design.md 1.1

The three families differ only in the adaptor that yields h. Blocks are pre-activation blocks
(He et al., "Identity Mappings in Deep Residual Networks"), also for the ImageNet-style depths,
because a post-activation block applies a ReLU after the sum and so is not an Euler step.
"""

from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from models import stiffness

FAMILIES = ("resnet", "se", "stepnet")
# depth -> (block kind, blocks per stage); CIFAR style (32x32, 3 stages) and ImageNet style (4 stages)
CIFAR_DEPTHS: dict[int, tuple[str, int]] = {
    20: ("basic", 3), 56: ("basic", 9), 110: ("basic", 18), 164: ("bottleneck", 18)}
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}
DEPTHS = tuple(sorted({**CIFAR_DEPTHS, **IMAGENET_DEPTHS}))


@dataclass(frozen=True)
class NetConfig:
    family: str                    # resnet | se | stepnet
    depth: int                     # one of DEPTHS; it picks the CIFAR or ImageNet layout
    num_classes: int
    input_size: int = 32
    in_channels: int = 3
    reduction: int = 16            # adaptor hidden width: max(C / reduction, 4)
    adaptor_blocks: tuple[str, ...] | None = None   # layer names that get an adaptor; None: all
    # initial bias of the adaptor's last layer: h starts near sigmoid(bias) (3: about 0.95, the
    # plain network's steps of 1); None: PyTorch's default init, h near 0.5 (se and stepnet only)
    adaptor_bias: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose from {', '.join(FAMILIES)}")
        if self.depth not in DEPTHS:
            raise ValueError(f"unknown depth {self.depth}; choose from {', '.join(map(str, DEPTHS))}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.adaptor_bias is not None and (self.family == "resnet" or not abs(self.adaptor_bias) < 30):
            raise ValueError(f"an adaptor bias is for se and stepnet, and from -30 to 30; got "
                             f"{self.adaptor_bias} for {self.family}")

    @property
    def imagenet_style(self) -> bool:
        return self.depth in IMAGENET_DEPTHS


# -------------------------------------------------------- step-size adaptors (docs/design.md 1.2)
# Each adaptor names its fused ONNX node (op_name: ai.stepnet::<op_name>Step, <op_name>FirstStep)
# and lists its weights in that node's input order: (node input, parameter) pairs.

class ConstantAdaptor(nn.Module):
    """resnet: h = 1."""
    op_name, uses_stiffness, weights = "Constant", False, ()

    def forward(self, f, s):
        return f.new_ones(f.shape[:2])                       # (B, C)


class SqueezeExcitationAdaptor(nn.Module):
    """se: h = sigmoid(W2 relu(W1 GAP(f)))."""
    op_name, uses_stiffness = "SqueezeExcitation", False
    weights = (("fc1_weight", "fc1.weight"), ("fc1_bias", "fc1.bias"),
               ("fc2_weight", "fc2.weight"), ("fc2_bias", "fc2.bias"))

    def __init__(self, channels: int, reduction: int, inputs_per_channel: int = 1):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(inputs_per_channel * channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, f, s):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(f.mean((2, 3))))))


class StiffnessAwareAdaptor(SqueezeExcitationAdaptor):
    """stepnet: h = sigmoid(W2 relu(W1 [GAP(f) ; log1p(s)]))."""
    op_name, uses_stiffness = "StiffnessAware", True

    def __init__(self, channels: int, reduction: int):
        super().__init__(channels, reduction, inputs_per_channel=2)

    def forward(self, f, s):
        z = torch.cat([f.mean((2, 3)), torch.log1p(s)], dim=1)   # (B, 2C)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))


ADAPTORS = {"resnet": ConstantAdaptor, "se": SqueezeExcitationAdaptor, "stepnet": StiffnessAwareAdaptor}


def make_adaptor(family: str, channels: int, reduction: int) -> nn.Module:
    adaptor = ADAPTORS[family]
    return adaptor() if adaptor is ConstantAdaptor else adaptor(channels, reduction)


# -------------------------------------------------------- the step (docs/design.md 1.4: one node when exported)

class Predecessor(NamedTuple):
    """x_{t-1} and f_{t-1}: the previous block of the same stage."""
    x: torch.Tensor
    f: torch.Tensor


class StepOutput(NamedTuple):
    x_next: torch.Tensor                 # (B, C, H, W)
    step_size: torch.Tensor | None       # (B, 3): mean, min, max of h over channels; None in training
    nsi: torch.Tensor | None             # (B,): NaN without a predecessor; None in training


class Step(nn.Module):
    """One explicit Euler step, x_next = x + h * f, with h from the adaptor and, with
    diagnostics, the step-size statistics and the NSI. Without a predecessor (the first block of
    a stage) s is 0 and NSI undefined. Without diagnostics (training) only what h needs is
    computed."""

    def __init__(self, adaptor: nn.Module):
        super().__init__()
        self.adaptor = adaptor

    def forward(self, x, f, prev: Predecessor | None = None, diagnostics: bool = True) -> StepOutput:
        s = nsi = None
        if prev is not None and (diagnostics or self.adaptor.uses_stiffness):
            s, nsi = stiffness.estimates(x, prev.x, f, prev.f)
        elif prev is None:
            s = torch.zeros_like(f[:, :, 0, 0])
            nsi = torch.full_like(f[:, 0, 0, 0], float("nan"))
        h = self.adaptor(f, s if self.adaptor.uses_stiffness else None)      # (B, C)
        x_next = x + h[:, :, None, None] * f
        if not diagnostics:
            return StepOutput(x_next, None, None)
        stats = torch.cat([h.mean(1, keepdim=True), h.amin(1, keepdim=True), h.amax(1, keepdim=True)], 1)
        return StepOutput(x_next, stats, nsi)      # cat rather than stack: 3 fewer graph nodes


# ---------------------------------------------------------------- residual branches f_t

class BasicBranch(nn.Module):
    """bn-relu-conv3x3-bn-relu-conv3x3. Returns f and the pre-activated input (the shortcut reads it)."""
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x), inplace=True)              # in place on BatchNorm's fresh output
        return self.conv2(F.relu(self.bn2(self.conv1(a)), inplace=True)), a


class BottleneckBranch(nn.Module):
    """bn-relu-conv1x1-bn-relu-conv3x3-bn-relu-conv1x1, widening by `expansion`."""
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch * self.expansion, 1, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x), inplace=True)
        y = F.relu(self.bn2(self.conv1(a)), inplace=True)
        return self.conv3(F.relu(self.bn3(self.conv2(y)), inplace=True)), a


Branch = BasicBranch | BottleneckBranch
BRANCHES: dict[str, type[Branch]] = {"basic": BasicBranch, "bottleneck": BottleneckBranch}


class Block(nn.Module):
    """A residual block: its branch f_t, the skip path x_t (the shortcut's projection where the
    shape changes), and the step x_{t+1} = x_t + h_t * f_t. `first`: first block of its stage,
    which has no predecessor, so s_t = 0 and NSI_t is undefined (docs/design.md 1.1)."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None, step: Step, first: bool):
        super().__init__()
        self.branch, self.shortcut, self.step, self.first = branch, shortcut, step, first

    def forward(self, x, prev: Predecessor | None, diagnostics: bool = True) -> tuple[StepOutput, Predecessor]:
        f, a = self.branch(x)                                            # f_t
        x = self.shortcut(a) if self.shortcut is not None else x         # x_t
        return self.step(x, f, prev, diagnostics), Predecessor(x, f)     # x_t + h_t * f_t


# ---------------------------------------------------------------- the network

class StepNet(nn.Module):
    """Backbone shared by the three families. forward(x, diagnostics=True) also returns
    step_size (B, L, 3: mean, min, max over channels) and nsi (B, L; NaN where undefined)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        widths: tuple[int, ...]
        self.stem: nn.Module
        if cfg.imagenet_style:
            kind, counts = IMAGENET_DEPTHS[cfg.depth]
            widths, width0 = (64, 128, 256, 512), 64
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, width0, 7, 2, 3, bias=False), nn.BatchNorm2d(width0),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            kind, n = CIFAR_DEPTHS[cfg.depth]
            counts, widths, width0 = (n, n, n), (16, 32, 64), 16
            self.stem = nn.Conv2d(cfg.in_channels, width0, 3, 1, 1, bias=False)
        self._layers: list[dict] = []
        stages, in_ch = [], width0
        for stage, (count, width) in enumerate(zip(counts, widths), start=1):
            stages.append(self._make_stage(BRANCHES[kind], stage, count, in_ch, width))
            in_ch = width * BRANCHES[kind].expansion
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(self, branch: type[Branch], stage: int, count: int, in_ch: int, width: int) -> nn.ModuleList:
        """`count` blocks; the first of a stage after the first halves the resolution, and where
        the shape changes its shortcut projects x. The adaptor follows the family, except on the
        blocks cfg.adaptor_blocks leaves out (those take h = 1)."""
        out_ch, blocks = width * branch.expansion, []
        for block in range(1, count + 1):
            name = f"stage{stage}.block{block}"
            stride = 2 if block == 1 and stage > 1 else 1
            with_adaptor = self.cfg.adaptor_blocks is None or name in self.cfg.adaptor_blocks
            adaptor = make_adaptor(self.cfg.family if with_adaptor else "resnet", out_ch, self.cfg.reduction)
            if self.cfg.adaptor_bias is not None and isinstance(adaptor, SqueezeExcitationAdaptor):
                nn.init.constant_(adaptor.fc2.bias, self.cfg.adaptor_bias)   # draws nothing: same RNG stream
            f = branch(in_ch, width, stride)       # modules made in this order: the RNG draws of init
            shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None
            blocks.append(Block(f, shortcut, Step(adaptor), first=block == 1))
            self._layers.append({"name": name, "stage": stage, "block": block, "channels": out_ch,
                                 "nsi_defined": block != 1})
            in_ch = out_ch
        return nn.ModuleList(blocks)

    def layers(self) -> list[dict]:
        """The layer table: one row per residual block in network order (name, stage, block,
        channels, nsi_defined). Export and service use it as the index of the diagnostics."""
        return [dict(row) for row in self._layers]

    def forward(self, x, diagnostics: bool = False):
        x = self.stem(x)                                   # (B, C0, H, W)
        steps = []
        for stage in self.stages:
            prev = None
            for block in cast(nn.ModuleList, stage):   # ModuleList is not generic
                step, prev = block(x, prev, diagnostics)
                x = step.x_next
                steps.append(step)
        x = F.relu(self.bn(x), inplace=True)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))   # (B, K)
        if not diagnostics:
            return logits
        return (logits, torch.stack([s.step_size for s in steps], dim=1),   # (B, L, 3)
                torch.stack([s.nsi for s in steps], dim=1))                  # (B, L)


def build(family: str, depth: int, num_classes: int, input_size: int = 32, in_channels: int = 3,
          **kwargs) -> StepNet:
    """The one entry point: build(family, depth, num_classes, input_size)."""
    return StepNet(NetConfig(family, depth, num_classes, input_size, in_channels, **kwargs))
