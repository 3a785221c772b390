"""Devices, precision and DistributedDataParallel under PyTorch's own launcher, torchrun.

`stepnet train` runs as one process, or as one of several that torchrun started (it sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous): then the process group is NCCL on GPUs and gloo on
CPUs, each process drives the GPU of its LOCAL_RANK, and rank 0 alone writes files. The
`--nproc-per-node` shortcut starts the same command through torch.distributed.run.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stepnet.errors import UserError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Context:
    device: torch.device
    reason: str                # why this device: logged
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_device(requested: str) -> tuple[torch.device, str]:
    """--device: auto is CUDA when torch sees a GPU. Raises UserError for cuda without one."""
    if requested not in DEVICES:
        raise UserError(f"unknown device {requested!r}; choose from {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise UserError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is "
                        "False); use --device cpu or auto")
    if requested == "cpu":
        return torch.device("cpu"), "--device cpu"
    if available:
        return torch.device("cuda"), f"--device {requested}: {torch.cuda.device_count()} CUDA GPU(s)"
    return torch.device("cpu"), "--device auto: torch sees no CUDA GPU"


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (float16 autocast with a GradScaler); "
                        "use bf16 on the CPU")


def check_processes(nproc: int, device: torch.device) -> None:
    if nproc < 1:
        raise UserError("--nproc-per-node must be at least 1")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc-per-node {nproc}, but this host has {torch.cuda.device_count()} "
                        f"CUDA GPU(s): one process per GPU")


def autocast(ctx: Context, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def setup(requested_device: str) -> Context:
    """This process's device and, under torchrun, its process group."""
    device, reason = choose_device(requested_device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device.type == "cuda":
            torch.cuda.set_device(0)
            device = torch.device("cuda", 0)
        return Context(device, reason)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        check_processes(local_world, device)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        torch.set_num_threads(max(1, usable_cores() // local_world))   # torchrun sets 1
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Context(device, f"{reason}; {backend} process group, rank {rank} of {world}",
                   rank, world, local_rank, local_world)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(ctx: Context, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """The tensor summed (or op-reduced) over all processes; itself when there is one."""
    if ctx.distributed:
        tensor = tensor.to(ctx.device)
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm with statistics over the global batch, for gloo (CPU) process groups, where
    torch.nn.SyncBatchNorm refuses to run. The per-channel sums are all-reduced through
    torch.distributed.nn's autograd-aware all_reduce, so the backward pass is synchronized too,
    in a process group of their own: DDP's gradient buckets are all-reduced from another thread
    during the same backward pass, and gloo pairs the collectives of one group by their order."""

    group: dist.ProcessGroup | None = None          # set by sync_batchnorm
    # _replace_bn copies them from a BatchNorm2d that tracks running statistics:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    momentum: float

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        c = x.shape[1]
        x32 = x.float()
        count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        totals = differentiable_all_reduce(torch.cat([x32.sum((0, 2, 3)), count]), group=self.group)
        n = totals[-1]
        mean = totals[:c] / n
        centred = x32 - mean[None, :, None, None]          # two passes: E[x^2] - E[x]^2 cancels
        var = differentiable_all_reduce((centred * centred).sum((0, 2, 3)), group=self.group) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
            self.num_batches_tracked += 1
        scale = self.weight / torch.sqrt(var + self.eps)
        return (centred * scale[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def sync_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """--sync-bn: torch's SyncBatchNorm on GPUs, GlooSyncBatchNorm on CPUs."""
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    group = dist.new_group(backend="gloo")
    assert isinstance(group, dist.ProcessGroup)       # every rank is a member
    GlooSyncBatchNorm.group = group
    return _replace_bn(model)


def _replace_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm):
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            _replace_bn(child)
    return module


def launch(nproc: int, launcher_args: list[str], command: list[str]) -> int:
    """`stepnet train --nproc-per-node N ...`: the same as `torchrun --nproc-per-node N
    [launcher args] -m stepnet <command>`, through torch.distributed.run."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = ["--nproc-per-node", str(nproc), *launcher_args, "-m", "stepnet", *command]
    if "--rdzv-endpoint" not in launcher_args and "--nnodes" not in launcher_args:
        argv = ["--standalone", *argv]             # one node: a free local rendezvous port
    try:
        torchrun.main(argv)
    except ChildFailedError as exc:
        first = next(iter(exc.failures.values()))
        return first.exitcode if first.exitcode > 0 else 1
    return 0
