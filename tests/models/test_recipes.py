"""The recipes against their formulas: the imagenet learning rate (linear warm-up, then cosine, peak
0.1 x global batch / 256), weight decay left off BatchNorm parameters and biases, the cifar recipe
as the default model was trained, overrides, and what a checkpoint records."""

import math

import pytest
import torch

from models import recipes
from models.net import build
from stepnet.errors import UserError


def test_the_imagenet_learning_rate_follows_warmup_then_cosine():
    r = recipes.recipe("imagenet", epochs=10, warmup_epochs=2).resolve(global_batch=512)
    assert r.lr == pytest.approx(0.2)                                # 0.1 x 512 / 256
    model = build("stepnet", 50, 10, 64)
    opt = recipes.optimizer(model, r)
    steps_per_epoch = 7
    schedule = recipes.scheduler(opt, r, steps_per_epoch)
    total, warmup = 10 * steps_per_epoch, 2 * steps_per_epoch
    seen = []
    for step in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    for step, lr in enumerate(seen):
        if step < warmup:
            expected = 0.2 * (step + 1) / warmup
        else:
            expected = 0.2 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12), step
    assert max(seen) == pytest.approx(0.2) and seen[warmup] == pytest.approx(0.2)
    assert seen[-1] < 0.2 * 0.01


def test_imagenet_decays_weights_but_not_norms_and_biases():
    model = build("stepnet", 50, 10, 64)
    r = recipes.recipe("imagenet").resolve(256)
    decay, no_decay = recipes.param_groups(model, r)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    ids = {id(p): name for name, p in named.items()}
    no_decay_names = {ids[id(p)] for p in no_decay["params"]}
    bn_and_bias = {n for n, p in named.items() if n.endswith(".bias") or ".bn" in n or n.startswith("bn.")
                   or "stem.1." in n}
    assert no_decay_names == bn_and_bias
    assert all(named[n].ndim > 1 for n in set(named) - no_decay_names)
    opt = recipes.optimizer(model, r)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_cifar_is_the_recipe_of_the_default_model():
    r = recipes.recipe("cifar").resolve(64)
    assert (r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay, r.label_smoothing) == (15, 64, 0.1, 0.9, 5e-4, 0.0)
    model = build("stepnet", 20, 10)
    (group,) = recipes.param_groups(model, r)
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == len(list(model.parameters()))
    schedule = recipes.scheduler(recipes.optimizer(model, r), r, steps_per_epoch=10)
    assert isinstance(schedule, torch.optim.lr_scheduler.OneCycleLR) and schedule.total_steps == 150


def test_overrides_and_defaults_by_depth():
    r = recipes.recipe("imagenet", epochs=3, lr=0.05, label_smoothing=0.0)
    assert (r.epochs, r.lr, r.label_smoothing, r.weight_decay) == (3, 0.05, 0.0, 1e-4)
    assert r.resolve(1024).lr == 0.05                                # an explicit lr is not scaled
    assert recipes.default_recipe(imagenet_style=True) == "imagenet"
    assert recipes.default_recipe(imagenet_style=False) == "cifar"
    with pytest.raises(UserError, match="unknown recipe"):
        recipes.recipe("imagenet-21k")
    with pytest.raises(UserError, match="must be positive"):
        recipes.recipe("cifar", epochs=0)


@pytest.mark.parametrize("images, processes, batch", [(1437, 1, 64), (45, 1, 8), (60, 2, 4), (9, 1, 2)])
def test_a_small_training_set_gets_a_batch_that_fits(images, processes, batch, capsys):
    from models.distributed import Context
    from models.train import MIN_STEPS_PER_EPOCH, _fitted

    fitted = _fitted(recipes.recipe("cifar"), images, Context(torch.device("cpu"), "test", world_size=processes))
    assert fitted.batch_size == batch
    said = capsys.readouterr().err
    if batch == 64:
        assert said == ""
    else:
        assert f"batch size {batch} per process instead" in said
        assert (images // processes) // batch >= min(MIN_STEPS_PER_EPOCH, (images // processes) // 2)
