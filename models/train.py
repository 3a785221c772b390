"""Training and evaluation, on the CPU or GPUs, in one process or several under torchrun.

A run writes into OUT: metrics.jsonl (one line per epoch, rank 0), snapshot/ (models.snapshot:
every --save-every epochs and on SIGTERM, so that --resume, or torchrun's restart after a
failure, goes on where it stopped), and when training ends the checkpoint (model.safetensors,
config.json) as models.checkpoint writes it, after which snapshot/ is removed. OUT holds a
config.json only once a run has finished, so nothing reads a half-trained model as a checkpoint.
Everything a command gets wrong is refused before OUT is touched. A run that fails or is
interrupted keeps OUT if it holds a snapshot (so that it can be resumed), and removes it if not.
"""

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from models import checkpoint, data, distributed, loading, recipes, snapshot
from models.distributed import Context
from models.net import NetConfig, StepNet
from stepnet.errors import UserError
from stepnet.repository import STEP_MEAN

MIN_STEPS_PER_EPOCH = 4   # a small training set gets a smaller batch rather than fewer steps (_fitted)
CHECK_EVERY = 20     # steps between the checks that need a device sync (loss finite, SIGTERM in DDP)


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    dataset: str = "digits"
    data_dir: Path | None = None
    family: str = "stepnet"
    depth: int = 20
    recipe: str | None = None          # None: imagenet for ImageNet-style depths, else cifar
    epochs: int | None = None          # None: the recipe's value (and so on for the next six)
    batch_size: int | None = None      # per process
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    seed: int = 0
    input_size: int | None = None
    adaptor_blocks: tuple[str, ...] | None = None
    adaptor_bias: float | None = None      # models.net.NetConfig.adaptor_bias
    train_images: int | None = None    # train on a fixed random subset of this many images
    ink_margin: float | None | Literal["auto"] = "auto"     # models.data.load's: the data set's own by default
    workers: int | None = None         # None: loading.default_workers
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    sync_bn: bool = False
    resume: bool = False
    save_every: int = 1
    test_every: int = 1                # test after every N-th epoch and the last; 0: never (test_accuracy null)
    force: bool = False
    progress: bool = True


def fixed_subset(dataset, n: int) -> Subset:
    """The first n items of a fixed random permutation: the same images for every seed and run."""
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(data.SPLIT_SEED))
    return Subset(dataset, keep[:n].tolist())


def _inputs(images: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.device.type == "cuda":          # channels_last: the layout cuDNN's fast kernels take
        return images.to(ctx.device, non_blocking=True, memory_format=torch.channels_last)
    return images


@torch.no_grad()
def evaluate(model: StepNet, dataset, batch_size: int = 256, workers: int = 0, ctx: Context | None = None,
             precision: str = "fp32") -> dict:
    """Top-1 accuracy and per-layer means of step size and NSI (NaN-aware) over `dataset`,
    sharded over the processes of `ctx` and summed over them."""
    ctx = ctx or Context(next(model.parameters()).device, "evaluation")
    model.eval()
    n_layers = len(model.layers())
    sums = torch.zeros(2 + 3 * n_layers, dtype=torch.float64, device=ctx.device)   # correct, total, per layer
    for images, labels in loading.eval_loader(dataset, ctx, batch_size, workers):
        labels = labels.to(ctx.device, non_blocking=True)
        with distributed.autocast(ctx, precision):
            logits, step_size, nsi = model(_inputs(images, ctx), diagnostics=True)
        step_size, nsi = step_size.double(), nsi.double()
        defined = ~torch.isnan(nsi)
        sums[0] += (logits.argmax(1) == labels).sum()
        sums[1] += len(labels)
        sums[2:2 + n_layers] += step_size[:, :, STEP_MEAN].sum(0)
        sums[2 + n_layers:2 + 2 * n_layers] += torch.where(defined, nsi, 0).sum(0)
        sums[2 + 2 * n_layers:] += defined.sum(0)
    correct, total, *rest = distributed.all_reduce(ctx, sums).tolist()
    steps, nsis, counts = rest[:n_layers], rest[n_layers:2 * n_layers], rest[2 * n_layers:]
    layers = [{**row, "step_size_mean": s / total, "nsi_mean": n / c if c else None}
              for row, s, n, c in zip(model.layers(), steps, nsis, counts)]
    return {"accuracy": correct / total, "samples": int(total), "layers": layers}


class _Stop:
    """SIGTERM asks the run to write a snapshot and end (exit 0)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _identity(net_cfg: NetConfig, cfg: TrainConfig, recipe: recipes.Recipe, global_batch: int) -> dict:
    """What makes two runs the same run (models.snapshot.check_identity), as JSON reads it back."""
    return json.loads(json.dumps({
        "model": asdict(net_cfg), "dataset": cfg.dataset, "train_images": cfg.train_images,
        "ink_margin": cfg.ink_margin,
        "recipe": recipe.to_dict(), "seed": cfg.seed, "global_batch": global_batch,
        "precision": cfg.precision, "sync_bn": cfg.sync_bn}))


def _fitted(recipe: recipes.Recipe, images: int, ctx: Context) -> recipes.Recipe:
    """The recipe with a smaller batch where the training set is too small for its own: the
    largest power of two that still gives MIN_STEPS_PER_EPOCH full global batches an epoch (at
    least 2 images, for BatchNorm), said on stderr. A --batch-size the user gave is kept as given."""
    per_process = images // ctx.world_size
    if per_process // recipe.batch_size >= MIN_STEPS_PER_EPOCH:
        return recipe
    size = 2
    while size * 2 <= recipe.batch_size and per_process // (size * 2) >= MIN_STEPS_PER_EPOCH:
        size *= 2
    if ctx.main:
        print(f"stepnet train: {images} training images are few for batches of {recipe.batch_size}: "
              f"batch size {size} per process instead, {per_process // size} steps an epoch "
              f"(--batch-size sets it)", file=sys.stderr)
    return replace(recipe, batch_size=size)


def prepare(cfg: TrainConfig, ctx: Context) -> dict:
    """Everything a run needs that can be refused, checked before OUT is touched: the data, the
    network, the recipe, the output folder or the snapshot to resume."""
    distributed.check_precision(cfg.precision, ctx.device)
    if cfg.save_every < 1:
        raise UserError("--save-every must be at least 1")
    if cfg.test_every < 0:
        raise UserError("--test-every must be 0 (never) or more")
    train_set, info = data.load(cfg.dataset, "train", cfg.data_dir, augment=True, input_size=cfg.input_size,
                                ink_margin=cfg.ink_margin)
    test_set, _ = data.load(cfg.dataset, "test", cfg.data_dir, input_size=cfg.input_size,
                            ink_margin=cfg.ink_margin)
    try:
        net_cfg = NetConfig(cfg.family, cfg.depth, len(info.classes), info.input_size, info.in_channels,
                            adaptor_blocks=cfg.adaptor_blocks, adaptor_bias=cfg.adaptor_bias)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.train_images is not None:
        if not 1 <= cfg.train_images <= len(train_set):
            raise UserError(f"the number of training images must be between 1 and {len(train_set)}")
        train_set = fixed_subset(train_set, cfg.train_images)
    recipe = recipes.recipe(cfg.recipe or recipes.default_recipe(net_cfg.imagenet_style),
                            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
                            label_smoothing=cfg.label_smoothing)
    if cfg.batch_size is None:
        recipe = _fitted(recipe, len(train_set), ctx)
    global_batch = recipe.batch_size * ctx.world_size
    recipe = recipe.resolve(global_batch)
    if loading.steps_per_epoch(len(train_set), ctx, recipe.batch_size) < 1:
        raise UserError(f"{len(train_set)} training images do not fill one global batch of {global_batch} "
                        f"(--batch-size {recipe.batch_size} per process, {ctx.world_size} process(es))")
    identity = _identity(net_cfg, cfg, recipe, global_batch)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = cfg.resume or (restarted and snapshot.exists(cfg.out))
    if resume:
        snapshot.check_identity(snapshot.read_info(cfg.out)["identity"], identity)
    elif cfg.out.exists() and not (cfg.force or restarted):
        hint = ", or --resume to continue it" if snapshot.exists(cfg.out) else ""
        raise UserError(f"{cfg.out} already exists (use --force to replace it{hint})")
    elif cfg.out.parent.exists() and not cfg.out.parent.is_dir():
        raise UserError(f"{cfg.out.parent} is not a folder")
    return {"train_set": train_set, "test_set": test_set, "info": info, "net_cfg": net_cfg, "recipe": recipe,
            "global_batch": global_batch, "identity": identity, "resume": resume}


def train(cfg: TrainConfig) -> dict | None:
    """Train one model; returns the checkpoint config written to cfg.out, or None when SIGTERM
    stopped the run (a snapshot was written)."""
    ctx = distributed.setup(cfg.device)
    try:
        run = _Run(cfg, ctx, prepare(cfg, ctx))
        try:
            return run.run()
        except BaseException:      # failed or interrupted: keep OUT only if there is a snapshot to resume
            if ctx.main and run.created and not snapshot.exists(cfg.out):
                shutil.rmtree(cfg.out, ignore_errors=True)
            raise
    finally:
        distributed.teardown(ctx)


class _Run:
    def __init__(self, cfg: TrainConfig, ctx: Context, plan: dict):
        self.cfg, self.ctx, self.plan = cfg, ctx, plan
        self.recipe: recipes.Recipe = plan["recipe"]
        self.workers = loading.default_workers(ctx) if cfg.workers is None else cfg.workers
        torch.manual_seed(cfg.seed)
        self.net = StepNet(plan["net_cfg"])
        model = distributed.sync_batchnorm(self.net, ctx) if cfg.sync_bn and ctx.distributed else self.net
        model = model.to(ctx.device)
        if ctx.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if ctx.distributed:
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                            else None)
        # torch.compile of a Module is a Module (an OptimizedModule); torch types it as any callable
        self.model = cast(nn.Module, torch.compile(model)) if cfg.compile else model
        self.loader = loading.train_loader(plan["train_set"], ctx, cfg.seed, self.recipe.batch_size, self.workers)
        self.steps_per_epoch = loading.steps_per_epoch(len(plan["train_set"]), ctx, self.recipe.batch_size)
        self.optimizer = recipes.optimizer(self.net, self.recipe)
        self.schedule = recipes.scheduler(self.optimizer, self.recipe, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.position: dict[str, Any] = {"epoch": 1, "step": 0, "sums": [0.0, 0.0, 0.0, 0.0], "train_seconds": 0.0}
        self.created = False       # this run made OUT (it was not resumed)

    def _say(self, text: str) -> None:
        if self.ctx.main and self.cfg.progress:
            tqdm.write(text, file=sys.stderr)

    def _start(self) -> None:
        out = self.cfg.out
        if self.plan["resume"]:
            state = snapshot.load_state(out, "cpu")
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.position = state["position"]
            if self.ctx.main:      # epochs after the snapshot's are done again: their lines go
                log = out / "metrics.jsonl"
                rows = [line for line in log.read_text().splitlines()
                        if json.loads(line)["epoch"] < self.position["epoch"]] if log.is_file() else []
                log.write_text("".join(row + "\n" for row in rows))
            self._say(f"resuming {out} at epoch {self.position['epoch']}, step {self.position['step']}")
        else:
            self.created = True
            if self.ctx.main:
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
        distributed.barrier(self.ctx)
        r = self.recipe
        self._say(f"device: {self.ctx.reason}; {self.cfg.precision}; global batch {self.plan['global_batch']} "
                  f"({self.ctx.world_size} x {r.batch_size}); recipe {r.name}: lr {r.lr:g}, {r.epochs} epochs, "
                  f"{self.steps_per_epoch} steps each; {self.workers} data workers per process")

    def _snapshot(self) -> None:
        if self.ctx.main:
            snapshot.save(self.cfg.out, self.plan["identity"], self.position, {
                "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict()})
        distributed.barrier(self.ctx)

    def run(self) -> dict | None:
        self._start()
        started = time.perf_counter() - self.position["train_seconds"]
        with _Stop() as stop:
            for epoch in range(self.position["epoch"], self.recipe.epochs + 1):
                row = self._epoch(epoch, stop)
                if row is None:
                    self._stopped()
                    return None
                test = self._test(epoch)
                if test is not None:
                    row["test_accuracy"] = test["accuracy"]
                row["seconds"] = round(time.perf_counter() - started, 2)
                if self.ctx.main:
                    with open(self.cfg.out / "metrics.jsonl", "a") as log:
                        log.write(json.dumps(row) + "\n")
                tested = "" if test is None else f"test {test['accuracy']:.4f}  "
                self._say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train {row['train_accuracy']:.4f}  "
                          f"{tested}{row['images_per_s']:.0f} img/s  "
                          f"data wait {100 * row['data_wait_fraction']:.0f}%")
                self.position = {"epoch": epoch + 1, "step": 0, "sums": [0.0] * 4,
                                 "train_seconds": time.perf_counter() - started}
                if epoch < self.recipe.epochs and self._agreed(stop):
                    self._stopped()
                    return None
                if epoch % self.cfg.save_every == 0 and epoch < self.recipe.epochs:
                    self._snapshot()
        assert row is not None       # the loop ran: a snapshot is never taken after the last epoch
        return self._finish(test, row, time.perf_counter() - started)

    def _test(self, epoch: int) -> dict | None:
        """evaluate() on the test split after every --test-every-th epoch and the last; None when
        this epoch is not tested (never with --test-every 0: the analysis measures the test split
        itself, so a pass here would be done twice)."""
        every = self.cfg.test_every
        if not every or (epoch % every and epoch < self.recipe.epochs):
            return None
        return evaluate(self.net, self.plan["test_set"], workers=self.workers, ctx=self.ctx,
                        precision=self.cfg.precision)

    def _agreed(self, stop: _Stop) -> bool:
        """Whether any process was asked to stop (every process takes part, so all agree)."""
        flag = torch.tensor([float(stop.requested)], device=self.ctx.device)
        return bool(distributed.all_reduce(self.ctx, flag, op=torch.distributed.ReduceOp.MAX)[0])

    def _stopped(self) -> None:
        self._snapshot()
        self._say(f"stopped by SIGTERM at epoch {self.position['epoch']}, step {self.position['step']}: "
                  f"snapshot written; `--resume` goes on from there")

    def _epoch(self, epoch: int, stop: _Stop) -> dict | None:
        """One epoch from self.position; its metrics row, or None when a stop was asked for."""
        ctx, skip = self.ctx, self.position["step"]
        cast(loading.EpochShard, self.loader.sampler).set_epoch(epoch, skip)     # train_loader's
        self.model.train()
        sums = torch.tensor(self.position["sums"], dtype=torch.float64, device=ctx.device)  # loss, correct, seen, wait
        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}/{self.recipe.epochs}",
                   leave=False, disable=not (self.cfg.progress and ctx.main), file=sys.stderr)
        batches, step, began = iter(self.loader), skip, time.perf_counter()
        while True:
            waited = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            sums[3] += time.perf_counter() - waited
            labels = labels.to(ctx.device, non_blocking=True)
            with distributed.autocast(ctx, self.cfg.precision):
                logits = self.model(_inputs(images, ctx))
                loss = self.loss_fn(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            sums[0] += loss.detach().double() * len(labels)
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += len(labels)
            step += 1
            bar.update()
            if step % CHECK_EVERY == 0 or step == self.steps_per_epoch or (stop.requested and not ctx.distributed):
                flags = distributed.all_reduce(ctx, torch.tensor(
                    [float(stop.requested), float(not math.isfinite(sums[0].item()))], device=ctx.device),
                    op=torch.distributed.ReduceOp.MAX)
                if flags[1]:
                    raise UserError(f"training diverged at epoch {epoch} (the loss is not finite); lower --lr")
                bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.3f}",
                                acc=f"{sums[1].item() / sums[2].item():.3f}")
                if flags[0] and step < self.steps_per_epoch:
                    self.position = {**self.position, "step": step, "sums": sums.tolist(),
                                     "train_seconds": self.position["train_seconds"] + time.perf_counter() - began}
                    bar.close()
                    return None
        bar.close()
        seconds = time.perf_counter() - began
        loss_sum, correct, seen, wait = distributed.all_reduce(ctx, sums).tolist()
        done = (self.steps_per_epoch - skip) * self.plan["global_batch"]
        return {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                "lr": self.schedule.get_last_lr()[0], "images_per_s": done / seconds,
                "data_wait_fraction": min(1.0, wait / ctx.world_size / seconds),
                "global_batch": self.plan["global_batch"], "processes": ctx.world_size}

    def _finish(self, test: dict | None, row: dict, seconds: float) -> dict:
        cfg, r = self.cfg, self.recipe
        if self.ctx.main:
            checkpoint.save(self.net, self.plan["info"], cfg.out, dataset=cfg.dataset,
                            data_dir=None if cfg.data_dir is None else str(cfg.data_dir.resolve()),
                            epochs=r.epochs,
                            seed=cfg.seed, batch_size=r.batch_size, lr=r.lr, recipe=r.to_dict(),
                            global_batch=self.plan["global_batch"], processes=self.ctx.world_size,
                            device=self.ctx.device.type, precision=cfg.precision, sync_bn=cfg.sync_bn,
                            compile=cfg.compile, train_images=len(self.plan["train_set"]),
                            test_accuracy=None if test is None else test["accuracy"],
                            images_per_s=round(row["images_per_s"], 1),
                            train_seconds=round(seconds, 1))
            shutil.rmtree(snapshot.folder(cfg.out), ignore_errors=True)
        distributed.barrier(self.ctx)
        return checkpoint.read_config(cfg.out)

