"""StepNet and its baselines: one pre-activation ResNet backbone, three step-size adaptors.

A residual network is forward Euler on dx/dt = f(x, t) (DESIGN 1):

    resnet    x_next = x + 1   * f
    se        x_next = x + h(f) * f
    stepnet   x_next = x + h(f, s) * f        s: channel stiffness of DESIGN 1.1

The three families differ only in the adaptor that yields h. Blocks are pre-activation blocks
(He et al., "Identity Mappings in Deep Residual Networks"), also for the ImageNet-style depths,
because a post-activation block applies a ReLU after the sum and so is not an Euler step.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import stiffness

FAMILIES = ("resnet", "se", "stepnet")
# depth -> (block kind, blocks per stage); CIFAR style (32x32, 3 stages) and ImageNet style (4 stages)
CIFAR_DEPTHS = {20: ("basic", 3), 56: ("basic", 9), 110: ("basic", 18), 164: ("bottleneck", 18)}
IMAGENET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
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

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose from {', '.join(FAMILIES)}")
        if self.depth not in DEPTHS:
            raise ValueError(f"unknown depth {self.depth}; choose from {', '.join(map(str, DEPTHS))}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    @property
    def imagenet_style(self) -> bool:
        return self.depth in IMAGENET_DEPTHS


# ---------------------------------------------------------------- step-size adaptors (DESIGN 1.2)

class ConstantStep(nn.Module):
    """resnet: h = 1."""
    uses_stiffness = False

    def forward(self, f, s):
        return f.new_ones(f.shape[:2])                       # (B, C)


class SqueezeExcitationStep(nn.Module):
    """se: h = sigmoid(W2 relu(W1 GAP(f)))."""
    uses_stiffness = False

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, f, s):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(f.mean((2, 3))))))


class StiffnessAwareStep(nn.Module):
    """stepnet: h = sigmoid(W2 relu(W1 [GAP(f) ; log1p(s)]))."""
    uses_stiffness = True

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, f, s):
        z = torch.cat([f.mean((2, 3)), torch.log1p(s)], dim=1)   # (B, 2C)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))


def make_adaptor(family: str, channels: int, reduction: int) -> nn.Module:
    if family == "se":
        return SqueezeExcitationStep(channels, reduction)
    if family == "stepnet":
        return StiffnessAwareStep(channels, reduction)
    return ConstantStep()


# ---------------------------------------------------------------- the step (DESIGN 1.4: one node when exported)

def _step_stats(h):
    # (B, 3): mean, min, max over channels; keepdim + cat rather than stack: 3 fewer graph nodes
    return torch.cat([h.mean(1, keepdim=True), h.amin(1, keepdim=True), h.amax(1, keepdim=True)], 1)


class Step(nn.Module):
    """x_next = x + h * f for a block with a predecessor in its stage, with its diagnostics."""

    def __init__(self, adaptor: nn.Module):
        super().__init__()
        self.adaptor = adaptor

    def forward(self, x, f, x_prev, f_prev):
        s, nsi = stiffness.estimates(x, x_prev, f, f_prev)
        h = self.adaptor(f, s if self.adaptor.uses_stiffness else None)     # (B, C)
        x_next = x + h[:, :, None, None] * f
        return x_next, _step_stats(h), nsi

    def update(self, x, f, x_prev, f_prev):
        """x_next alone, for training without diagnostics: the stiffness estimate is taken only
        where the adaptor reads it."""
        s = stiffness.estimates(x, x_prev, f, f_prev)[0] if self.adaptor.uses_stiffness else None
        return x + self.adaptor(f, s)[:, :, None, None] * f


class FirstStep(Step):
    """The first block of a stage: no predecessor, so s = 0 and NSI is undefined (NaN)."""

    def forward(self, x, f):
        s = torch.zeros_like(f[:, :, 0, 0]) if self.adaptor.uses_stiffness else None
        h = self.adaptor(f, s)
        x_next = x + h[:, :, None, None] * f
        return x_next, _step_stats(h), torch.full_like(f[:, 0, 0, 0], float("nan"))

    def update(self, x, f):
        s = torch.zeros_like(f[:, :, 0, 0]) if self.adaptor.uses_stiffness else None
        return x + self.adaptor(f, s)[:, :, None, None] * f


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


BRANCHES = {"basic": BasicBranch, "bottleneck": BottleneckBranch}


class Block(nn.Module):
    def __init__(self, branch: type[nn.Module], in_ch: int, ch: int, stride: int, adaptor: nn.Module,
                 first: bool):
        super().__init__()
        out_ch = ch * branch.expansion
        self.branch = branch(in_ch, ch, stride)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
                         if stride != 1 or in_ch != out_ch else None)
        self.step = FirstStep(adaptor) if first else Step(adaptor)

    def forward(self, x, prev, diagnostics: bool = True):
        """prev: (x_prev, f_prev) of the previous block of this stage, or () for the first block.
        Without diagnostics (training) the step's statistics and NSI are None."""
        f, a = self.branch(x)
        skip = self.shortcut(a) if self.shortcut is not None else x   # x_t of DESIGN 1.1
        if not diagnostics:
            return self.step.update(skip, f, *prev), (skip, f), None, None
        x_next, stats, nsi = self.step(skip, f, *prev)
        return x_next, (skip, f), stats, nsi


# ---------------------------------------------------------------- the network

class StepNet(nn.Module):
    """Backbone shared by the three families. forward(x, diagnostics=True) also returns
    step_size (B, L, 3: mean, min, max over channels) and nsi (B, L; NaN where undefined)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
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
        branch = BRANCHES[kind]
        self._layers: list[dict] = []
        stages, in_ch = [], width0
        for si, (count, width) in enumerate(zip(counts, widths), start=1):
            blocks = []
            for bi in range(1, count + 1):
                name = f"stage{si}.block{bi}"
                out_ch = width * branch.expansion
                with_adaptor = cfg.adaptor_blocks is None or name in cfg.adaptor_blocks
                adaptor = make_adaptor(cfg.family if with_adaptor else "resnet", out_ch, cfg.reduction)
                stride = 2 if bi == 1 and si > 1 else 1
                blocks.append(Block(branch, in_ch, width, stride, adaptor, first=bi == 1))
                self._layers.append({"name": name, "stage": si, "block": bi, "channels": out_ch})
                in_ch = out_ch
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def layers(self) -> list[dict]:
        """The layer table: one row per residual block in network order (name, stage, block,
        channels, nsi_defined). Export and service use it as the index of the diagnostics."""
        return [{**row, "nsi_defined": row["block"] > 1} for row in self._layers]

    def forward(self, x, diagnostics: bool = False):
        x = self.stem(x)                                   # (B, C0, H, W)
        stats, nsis = [], []
        for stage in self.stages:
            prev = ()
            for block in stage:
                x, prev, st, n = block(x, prev, diagnostics)
                stats.append(st)
                nsis.append(n)
        x = F.relu(self.bn(x), inplace=True)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))   # (B, K)
        if not diagnostics:
            return logits
        return logits, torch.stack(stats, dim=1), torch.stack(nsis, dim=1)   # (B, L, 3), (B, L)


def build(family: str, depth: int, num_classes: int, input_size: int = 32, in_channels: int = 3,
          **kwargs) -> StepNet:
    """The one entry point: build(family, depth, num_classes, input_size)."""
    return StepNet(NetConfig(family, depth, num_classes, input_size, in_channels, **kwargs))
