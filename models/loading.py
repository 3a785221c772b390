"""Feeding the training loop the same global batches whatever the number of processes.

Each epoch draws one permutation of the training set (DistributedSampler, seed + epoch); global
batch j is the j-th run of `global batch` indices of it, and each process takes its share
(DistributedSampler gives rank r the indices r, r + N, ...; a process's j-th batch of B is then
its share of global batch j). The incomplete last global batch is dropped, so every step sees a
full global batch. Augmentation draws its randomness from a seed made of (seed, epoch, index),
not from the process's RNG: an image is augmented the same way on any process, by any worker,
after any resume. So 1 process with batch 2B and 2 processes with batch B see the same images,
augmented the same, in every step.
"""

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from models.data import SizedDataset
from models.distributed import Context, usable_cores


class SeededAugmentation(Dataset):
    """Item `epoch * N + i` is item i of `dataset` with its random transforms seeded by
    (seed, epoch, i). The caller's RNG state is left as it was."""

    def __init__(self, dataset: SizedDataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)

    def __len__(self):
        return self.n

    def __getitem__(self, key: int):
        epoch, i = divmod(key, self.n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % (2**63))
            return self.dataset[i]


class EpochShard(Sampler):
    """This process's share of one epoch's permutation, as keys SeededAugmentation reads,
    starting after `skip` of its batches (a run resumed in the middle of an epoch)."""

    def __init__(self, n: int, ctx: Context, seed: int, batch_size: int):
        self.n, self.batch_size = n, batch_size
        # DistributedSampler takes only the len() of its data set, which torch types as a Dataset
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(n), num_replicas=ctx.world_size, rank=ctx.rank,  # type: ignore[arg-type]
            shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.sampler)[self.skip * self.batch_size:]
        return iter(self.epoch * self.n + i for i in indices)

    def __len__(self):
        return len(self.sampler) - self.skip * self.batch_size


def steps_per_epoch(n: int, ctx: Context, batch_size: int) -> int:
    """Full global batches per epoch (the same for any number of processes)."""
    return (n // ctx.world_size) // batch_size


def default_workers(ctx: Context) -> int:
    """DataLoader workers per process: the usable cores shared by the processes of this node.
    Even on 2 CPU cores that train as well, 2 workers beat none (digits: 357 against 312 img/s;
    the time waiting for data went from 24 % to 2 %)."""
    return max(1, usable_cores() // ctx.local_world_size)


def _loader_options(ctx: Context, workers: int) -> dict:
    options = {"num_workers": workers, "pin_memory": ctx.device.type == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def train_loader(dataset: SizedDataset, ctx: Context, seed: int, batch_size: int, workers: int) -> DataLoader:
    sampler = EpochShard(len(dataset), ctx, seed, batch_size)
    return DataLoader(SeededAugmentation(dataset, seed), batch_size=batch_size, sampler=sampler,
                      drop_last=True, **_loader_options(ctx, workers))


def eval_loader(dataset: SizedDataset, ctx: Context, batch_size: int, workers: int) -> DataLoader:
    """This process's share of the evaluation set: items rank, rank + N, ...; no padding, so the
    counts summed over processes are exact."""
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, **_loader_options(ctx, workers))
