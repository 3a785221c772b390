"""Training recipes: optimizer, schedule and regularization, each value overridable by its flag.

    cifar      the recipe the default model is trained with (32x32 data): SGD, Nesterov momentum
               0.9, weight decay 5e-4 on every parameter, a one-cycle cosine schedule peaking at
               lr 0.1 after 15 % of the steps, 15 epochs, batch 64
    imagenet   the standard ResNet-50 recipe (Goyal et al., "Accurate, Large Minibatch SGD"; He et
               al., "Bag of Tricks"): SGD, Nesterov momentum 0.9, peak lr 0.1 x global batch / 256,
               5 epochs of linear warm-up then cosine decay to 0, weight decay 1e-4 on weights but
               not on BatchNorm parameters and biases, label smoothing 0.1, 90 epochs

The schedules are per optimizer step. The data augmentation belongs to the data set (models.data:
RandomResizedCrop and flips for image folders, resize 256 and centre crop 224 to evaluate).
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from stepnet.errors import UserError


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int                 # per process; the global batch is this x the processes
    lr: float | None                # peak learning rate; None: 0.1 x global batch / 256
    momentum: float
    weight_decay: float
    decay_norms_and_biases: bool    # weight decay on BatchNorm parameters and biases too
    schedule: str                   # "one-cycle" | "warmup-cosine"
    warmup_epochs: float            # warmup-cosine: linear warm-up length
    label_smoothing: float

    def resolve(self, global_batch: int) -> "Recipe":
        """The recipe with its learning rate fixed for this global batch."""
        return self if self.lr is not None else replace(self, lr=0.1 * global_batch / 256)

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {
    "cifar": Recipe("cifar", epochs=15, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                    decay_norms_and_biases=True, schedule="one-cycle", warmup_epochs=0.0,
                    label_smoothing=0.0),
    "imagenet": Recipe("imagenet", epochs=90, batch_size=64, lr=None, momentum=0.9, weight_decay=1e-4,
                       decay_norms_and_biases=False, schedule="warmup-cosine", warmup_epochs=5.0,
                       label_smoothing=0.1),
}
OVERRIDABLE = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs",
               "label_smoothing")


def recipe(name: str, **overrides) -> Recipe:
    """RECIPES[name] with every override that is not None; refuses values that cannot train."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"not recipe values: {sorted(unknown)}")
    chosen = replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    if chosen.epochs < 1 or chosen.batch_size < 1 or (chosen.lr is not None and not chosen.lr > 0):
        raise UserError("--epochs, --batch-size and --lr must be positive")
    if not (0 <= chosen.momentum < 1 and chosen.weight_decay >= 0 and chosen.warmup_epochs >= 0
            and 0 <= chosen.label_smoothing < 1):
        raise UserError("--momentum and --label-smoothing must be in [0, 1), --weight-decay and "
                        "--warmup-epochs not negative")
    return chosen


def default_recipe(imagenet_style: bool) -> str:
    """ImageNet-style depths (18, 34, 50, 101) train with the imagenet recipe, the others with cifar."""
    return "imagenet" if imagenet_style else "cifar"


def param_groups(model: nn.Module, r: Recipe) -> list[dict]:
    """Weight decay on conv and linear weights; on BatchNorm parameters and biases (the 1-d
    parameters) only where the recipe says so."""
    if r.decay_norms_and_biases:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": r.weight_decay}]
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer(model: nn.Module, r: Recipe) -> torch.optim.SGD:
    assert r.lr is not None, "a resolved recipe (Recipe.resolve)"
    return torch.optim.SGD(param_groups(model, r), lr=r.lr, momentum=r.momentum, nesterov=r.momentum > 0)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate over its peak at optimizer step `step` (0-based): linear warm-up from
    1 / warmup_steps to 1 over the first warmup_steps steps, then cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scheduler(opt: torch.optim.Optimizer, r: Recipe, steps_per_epoch: int):
    total = r.epochs * steps_per_epoch
    if r.schedule == "one-cycle":
        assert r.lr is not None, "a resolved recipe (Recipe.resolve)"
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total, pct_start=0.15,
                                                   anneal_strategy="cos")
    warmup = min(total, round(r.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup))
