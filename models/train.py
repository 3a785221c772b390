"""Training and evaluation: SGD with momentum, weight decay and a cosine schedule.

`train` builds the whole output folder under a temporary sibling name and renames it at the end,
so an interrupted or failed run leaves nothing half-written at --out.
"""

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models import checkpoint, data
from models.net import NetConfig, StepNet
from stepnet.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    dataset: str = "digits"
    data_dir: Path | None = None
    family: str = "stepnet"
    depth: int = 20
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    input_size: int | None = None
    adaptor_blocks: tuple[str, ...] | None = None
    train_images: int | None = None   # train on a fixed random subset of this many images; None: all
    workers: int = 0
    force: bool = False
    progress: bool = True


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=gen, persistent_workers=workers > 0)


def fixed_subset(dataset, n: int) -> Subset:
    """The first n items of a fixed random permutation: the same images for every seed and run."""
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(data.SPLIT_SEED))
    return Subset(dataset, keep[:n].tolist())


@torch.no_grad()
def evaluate(model: StepNet, dataset, batch_size: int = 256, workers: int = 0) -> dict:
    """Top-1 accuracy and per-layer means of step size and NSI (NaN-aware) over `dataset`."""
    model.eval()
    correct = total = 0
    step_sum = nsi_sum = nsi_count = None
    for images, labels in _loader(dataset, batch_size, False, workers):
        logits, step_size, nsi = model(images, diagnostics=True)
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
        batch_step = step_size[:, :, 0].sum(0)
        defined = ~torch.isnan(nsi)
        batch_nsi = torch.where(defined, nsi, 0).sum(0)
        step_sum = batch_step if step_sum is None else step_sum + batch_step
        nsi_sum = batch_nsi if nsi_sum is None else nsi_sum + batch_nsi
        nsi_count = defined.sum(0) if nsi_count is None else nsi_count + defined.sum(0)
    layers = []
    for row, s, n, c in zip(model.layers(), step_sum.tolist(), nsi_sum.tolist(), nsi_count.tolist()):
        layers.append({**row, "step_size_mean": s / total, "nsi_mean": n / c if c else None})
    return {"accuracy": correct / total, "samples": total, "layers": layers}


def _new_output(out: Path, force: bool) -> Path:
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def train(cfg: TrainConfig) -> dict:
    """Train one model; returns the checkpoint config (with test accuracy) written to cfg.out."""
    train_set, info = data.load(cfg.dataset, "train", cfg.data_dir, augment=True, input_size=cfg.input_size)
    test_set, _ = data.load(cfg.dataset, "test", cfg.data_dir, input_size=cfg.input_size)
    try:
        net_cfg = NetConfig(cfg.family, cfg.depth, len(info.classes), info.input_size, info.in_channels,
                            adaptor_blocks=cfg.adaptor_blocks)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UserError("--epochs, --batch-size and --lr must be positive")
    if cfg.train_images is not None:
        if not 1 <= cfg.train_images <= len(train_set):
            raise UserError(f"the number of training images must be between 1 and {len(train_set)}")
        train_set = fixed_subset(train_set, cfg.train_images)
    torch.manual_seed(cfg.seed)
    model = StepNet(net_cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    loader = _loader(train_set, cfg.batch_size, True, cfg.workers, cfg.seed)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15,
        anneal_strategy="cos")
    loss_fn = torch.nn.CrossEntropyLoss()

    tmp = _new_output(cfg.out, cfg.force)
    try:
        started = time.perf_counter()
        with open(tmp / "metrics.jsonl", "w") as log:
            for epoch in range(1, cfg.epochs + 1):
                model.train()
                seen = correct = 0
                loss_sum = 0.0
                bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not cfg.progress)
                for images, labels in bar:
                    logits = model(images)
                    loss = loss_fn(logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    if not math.isfinite(loss.item()):
                        raise UserError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower --lr")
                    seen += len(labels)
                    correct += int((logits.argmax(1) == labels).sum())
                    loss_sum += loss.item() * len(labels)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                test = evaluate(model, test_set, workers=cfg.workers)
                row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                       "test_accuracy": test["accuracy"], "lr": schedule.get_last_lr()[0],
                       "seconds": round(time.perf_counter() - started, 2)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if cfg.progress:
                    tqdm.write(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  "
                               f"train {row['train_accuracy']:.4f}  test {row['test_accuracy']:.4f}")
        checkpoint.save(model, info, tmp, dataset=cfg.dataset, epochs=cfg.epochs, seed=cfg.seed,
                        batch_size=cfg.batch_size, lr=cfg.lr, train_images=len(train_set),
                        test_accuracy=test["accuracy"],
                        train_seconds=round(time.perf_counter() - started, 1))
        if cfg.out.exists():
            shutil.rmtree(cfg.out)
        os.replace(tmp, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint.read_config(cfg.out)
