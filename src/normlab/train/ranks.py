"""Data-parallel training under torchrun: K processes of N images are one step of K*N images.

It is the same computation as `--virtual-gpus K` in one process (tests/test_distributed.py):
- every rank holds the same generator state, so all draw the same data order and the same
  augmentation numbers for the step's K*N images; rank r takes images r*N .. (r+1)*N - 1 and
  their numbers (Group.part);
- DDP averages the gradients. broadcast_buffers is off, so BN statistics stay per process (the
  GN paper's setting) and each rank's running statistics follow its own batches. They are
  linear in the batch statistics, so their average equals ghost BN's averaged update; it is
  taken before every evaluation and every checkpoint (Group.average_buffers);
- --sync-bn: nn.SyncBatchNorm on CUDA; on gloo (CPU), where PyTorch's refuses to run, an
  all-reduce of each channel's mean and E[x^2] (NaiveSyncBatchNorm, as detectron2's).

Rank 0 alone writes the run directory; every rank resumes from its checkpoint. Whatever one
rank could decide alone (stop on a signal, checkpoint now, an error while starting) is agreed
by all, so that no rank waits forever for another; the process-group timeout is the last resort.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import NormlabError

TIMEOUT = datetime.timedelta(minutes=30)  # the last resort against a rank that never answers
# Buffers (BN statistics) stay per rank between averages; newer torch renamed the option.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def processes() -> int:
    """The number of processes torchrun started for this run (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Single:
    """One process, with or without virtual GPUs: every collective is the identity."""

    rank, world, writer, backend, device = 0, 1, True, None, None

    def part(self, n: int) -> slice:
        """This rank's images of a step of n."""
        return slice(None)

    def shard(self, n: int) -> slice:
        """This rank's share of an evaluation split of n images."""
        return slice(None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag set on any rank, on every rank."""
        return flags

    def reduce_step(self, sums: torch.Tensor, *flags: bool) -> tuple:
        """A step's sums added over ranks, and its flags agreed: (sums, *flags)."""
        return (sums, *flags)

    def average_buffers(self, *modules: nn.Module) -> None:
        pass

    @contextlib.contextmanager
    def agreed(self):
        yield

    def check_same(self, facts: dict) -> None:
        pass

    def attach(self, run) -> None:
        pass

    def close(self) -> None:
        pass

    def execution(self, cfg) -> dict:
        how = "virtual devices in one process" if cfg.virtual_gpus > 1 else "one device"
        return {"devices": cfg.virtual_gpus, "images_per_device": cfg.batch_size, "how": how,
                "processes": 1, "backend": None}


SINGLE = Single()


class Group(Single):
    """This process's place in a torchrun group: rank, device, collectives."""

    def __init__(self, device_name: str):
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise NormlabError(f"WORLD_SIZE is set but {', '.join(missing)} is not; start several "
                               f"processes with torchrun (torchrun --nproc_per_node K -m normlab train ...)")
        self.rank, self.world = int(os.environ["RANK"]), processes()
        self.writer = self.rank == 0
        self.device = device_for(device_name, int(os.environ.get("LOCAL_RANK", self.rank)))
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            dist.init_process_group(self.backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as err:
            raise NormlabError(f"cannot join the other processes at {os.environ['MASTER_ADDR']}:"
                               f"{os.environ['MASTER_PORT']} ({first_line(err)}); start them with "
                               f"torchrun --standalone, which chooses a free port") from None
        # Agreements travel over gloo on the CPU, so that they never wait for the GPU's queue.
        self.control = dist.new_group(backend="gloo", timeout=TIMEOUT) if self.backend == "nccl" else None

    def part(self, n: int) -> slice:
        size = n // self.world  # n = K*N: equal parts by construction
        return slice(self.rank * size, (self.rank + 1) * size)

    def shard(self, n: int) -> slice:
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        votes = torch.tensor([int(bool(f)) for f in flags])
        dist.all_reduce(votes, group=self.control)
        return tuple(v > 0 for v in votes.tolist())

    def reduce_step(self, sums: torch.Tensor, *flags: bool) -> tuple:
        if self.control is not None:  # NCCL: the sums stay on the GPU, the votes go over gloo
            return (self.sum(sums), *self.agree(*flags))
        both = self.sum(torch.cat([sums, torch.tensor(flags, dtype=sums.dtype)]))  # one all-reduce
        return (both[:len(sums)], *(v > 0 for v in both[len(sums):].tolist()))

    def average_buffers(self, *modules: nn.Module) -> None:
        """Every floating-point buffer (BN running statistics and the like) := its mean over ranks."""
        buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world
        for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(value.view_as(b))

    @contextlib.contextmanager
    def agreed(self):
        """Run the block on every rank; if it fails on any, it fails on all with the same line."""
        failure = error = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 (every rank must hear of it, whatever it is)
            error = err
            failure = str(err) if isinstance(err, NormlabError) else f"{type(err).__name__}: {err}"
        failures: list = [None] * self.world
        dist.all_gather_object(failures, failure, group=self.control)
        first = next((r for r, f in enumerate(failures) if f is not None), None)
        if first is None:
            return
        if error is not None and not isinstance(error, NormlabError):
            raise error  # a bug: keep its traceback on the rank where it happened
        where = "" if first == 0 else f"rank {first}: "
        raise NormlabError(where + failures[first]) from None

    def check_same(self, facts: dict) -> None:
        """Refuse to start unless every rank reports the same facts as rank 0."""
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, facts, group=self.control)
        for rank, theirs in enumerate(everyone):
            for key, ours in everyone[0].items():
                if theirs[key] != ours:
                    raise NormlabError(f"rank {rank} has {key} {theirs[key]} but rank 0 has {ours}; "
                                       f"{CHECKS.get(key, 'start every process alike')}")

    def attach(self, run) -> None:
        """Synchronise BN if asked, then wrap the (compiled) model in DDP."""
        if run.cfg.sync_bn:
            # nn.SyncBatchNorm on NCCL; on gloo (CPU), where it refuses to run, the all-reduce version
            if not use_sync_bn(run.model, SyncBatchNormAct if self.backend == "nccl" else NaiveSyncBatchNorm):
                raise NormlabError(f"--sync-bn is implemented for BN layers, and norm '{run.cfg.norm}' "
                                   f"has none; drop --sync-bn")
        ids = [self.device.index] if self.device.type == "cuda" else None
        run.forward = DistributedDataParallel(run.forward, device_ids=ids, **NO_BUFFER_SYNC)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def execution(self, cfg) -> dict:
        return {"devices": cfg.virtual_gpus, "images_per_device": cfg.batch_size,
                "how": "processes (torchrun)", "processes": self.world, "backend": self.backend}


CHECKS = {
    "run": "start every process with the same arguments",
    "training images": "every process must read the same data (same --data, --data-dir contents and "
                       "--val-split), else the ranks would take different numbers of steps",
    "test images": "every process must read the same data (same --data and --data-dir contents)",
    "checkpoint (found, epoch, step)": "every process must see rank 0's run directory (one "
                                       "machine, or a file system that all nodes share)",
}


def exit_process(code: int) -> None:
    """Exit with `code`. Under torchrun without Python's and C++'s teardown, which now and then
    aborts in PyTorch's gloo/TCPStore threads ('terminate called without an active exception',
    SIGABRT instead of our exit code); every file is on disk by then and the group destroyed."""
    if processes() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def join(device_name: str) -> Single:
    """This process's group: a Group under torchrun with several processes, else SINGLE."""
    return Group(device_name) if processes() > 1 else SINGLE


def device_for(name: str, local_rank: int) -> torch.device:
    """The device of the process with this local rank: cuda:LOCAL_RANK or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise NormlabError(f"--device {name} under torchrun: each process takes the GPU of its local "
                           f"rank; use --device auto, cuda or cpu")
    if not torch.cuda.is_available():
        raise NormlabError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise NormlabError(f"torchrun started more processes on this machine than it has GPUs "
                           f"({torch.cuda.device_count()}); use --nproc_per_node "
                           f"{torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local_rank)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def lost_peer(err: BaseException) -> bool:
    """Did a collective fail because another rank died or stopped answering?"""
    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out")))


def batch_semantics(cfg, group: Single) -> str:
    k, n = cfg.virtual_gpus, cfg.batch_size
    if k == 1:
        return f"one device, {n} images per step"
    devices = f"{k} processes x {n} images per step" if group.world > 1 else \
        f"{k} virtual devices x {n} images per step"
    if cfg.sync_bn:
        return f"{devices}; BN statistics over all {k * n} images (--sync-bn)"
    return f"{devices}; BN statistics over each {n} images"


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss depends on
    every rank's share of the sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNormAct(nn.SyncBatchNorm):
    """nn.SyncBatchNorm (CUDA, NCCL), followed by ReLU where the BN it replaces had it (the
    registry's norm + act: models put the activation inside the norm module)."""

    act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return F.relu(out) if self.act else out


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batches of all ranks, for gloo
    on the CPU where nn.SyncBatchNorm refuses to run: one differentiable all-reduce of each
    channel's mean and E[x^2] (detectron2's NaiveSyncBatchNorm), taken about the running mean
    (the same on every rank) so that E[x^2] - mean^2 does not cancel away float32's digits.
    Every rank must hold the same number of images, which data-parallel steps guarantee.
    Followed by ReLU where the BN it replaces had it (act)."""

    act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        return F.relu(out) if self.act else out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        world = dist.get_world_size()
        channels = x.shape[1]
        shift = self.running_mean.detach().view(1, -1, 1, 1) if self.track_running_stats else 0
        centred = x.float() - shift
        moments = torch.cat([centred.mean(dim=(0, 2, 3)), (centred * centred).mean(dim=(0, 2, 3))])
        mean, mean_sq = (SumOverRanks.apply(moments) / world).split(channels)
        var = (mean_sq - mean * mean).clamp_min(0)  # biased, as BN normalizes with
        if self.track_running_stats:
            with torch.no_grad():
                count = x.numel() // channels * world
                self.running_mean.add_(mean, alpha=self.momentum)  # (1 - m) r + m (r + mean)
                self.running_var.lerp_(var * count / max(count - 1, 1), self.momentum)  # unbiased
                self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        offset = -mean * scale + (self.bias if self.bias is not None else 0)
        return (centred * scale.view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)).to(x.dtype)


def use_sync_bn(module: nn.Module, kind: type) -> bool:
    """Replace every BatchNorm2d under `module` by a `kind` (SyncBatchNormAct or
    NaiveSyncBatchNorm) holding the same parameters and buffers (so an optimizer built before
    keeps working) and the same activation. Any replaced?"""
    replaced = False
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, (NaiveSyncBatchNorm, nn.SyncBatchNorm)):
            sync = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.act = getattr(child, "act", False)
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean, sync.running_var = child.running_mean, child.running_var
            sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
            replaced = True
        else:
            replaced = use_sync_bn(child, kind) or replaced
    return replaced
