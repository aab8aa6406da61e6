"""One run: build, train, evaluate, checkpoint and resume, writing its run directory.

The data set lives on the training device as uint8; every step gathers a batch, augments
it there (data.augment) and takes one SGD step. Random numbers for data order and
augmentation come from one CPU generator saved in every checkpoint, so a resumed run
continues exactly as if it had never stopped (bit-identical on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, checkpoint, distributed, rundir
from .config import RunConfig, RuntimeOptions
from .data import Dataset, Normalizer, apply_augmentation, augment, draw_augmentation, load_dataset
from .errors import NormlabError
from .models import cifar_resnet
from .norms import norm_layers, parse_norm, precise_statistics, renorm_layers, set_chunk_size
from .precision import choose_amp

# Set by the CLI's signal handlers: finish the current step, checkpoint, exit.
STOP = threading.Event()
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped cleanly, run the same command again to resume
DIVERGENCE_CHECK_STEPS = 100


class Interrupted(Exception):
    """Training stopped on request after writing a checkpoint."""


class RunBusy(Exception):
    """Another live process holds the run's lock."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NormlabError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:K") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NormlabError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NormlabError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} "
                           f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of those")
    return device


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on every parameter unless wd_on_norm is off, in which
    case norm parameters and biases (all 1-d tensors) are not decayed."""
    if cfg.wd_on_norm:
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    else:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def evaluate(model, split, normalize, batch_size: int, autocast,
             group: distributed.Single = distributed.SINGLE) -> tuple[float, float]:
    """Mean loss and error (%) on a split, in eval mode (BN uses its running statistics).
    Under torchrun each rank evaluates its share and the sums are added up."""
    model.eval()
    share = group.shard(len(split))
    images, labels = split.images[share], split.labels[share]
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.images.device)
    wrong = torch.zeros((), dtype=torch.int64, device=split.images.device)
    with torch.inference_mode(), autocast():
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start:start + batch_size])
            y = labels[start:start + batch_size]
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            wrong += (out.argmax(1) != y).sum()
    loss_sum, wrong = group.sum(torch.stack([loss_sum, wrong.double()])).tolist()
    n = len(split)
    return loss_sum / n, 100.0 * wrong / n


class Run:
    """A run being trained in `run_dir`. Use train() below unless you need the pieces."""

    def __init__(self, cfg: RunConfig, run_dir: Path, opts: RuntimeOptions,
                 group: distributed.Single = distributed.SINGLE):
        self.cfg = cfg.normalized().validate()
        self.dir = Path(run_dir)
        self.opts = opts
        self.dist = group  # torchrun: this process's rank; collectives are no-ops in one process
        self.device = resolve_device(opts.device)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        # Everything that can fail on bad input fails here, before the run directory exists.
        self.data: Dataset = load_dataset(self.cfg.data, opts.data_dir, self.cfg.val_split).to(self.device)
        self.steps = len(self.data.train) // self.cfg.images_per_step
        if self.steps == 0:
            raise NormlabError(f"one step needs {self.cfg.images_per_step} images ({self.cfg.virtual_gpus} "
                               f"devices x {self.cfg.batch_size}) but the training set has "
                               f"{len(self.data.train)}; lower --batch-size, or the number of devices "
                               f"(--virtual-gpus, or torchrun's --nproc_per_node)")
        seed_everything(self.cfg.seed)
        self.model = cifar_resnet(self.cfg.model, self.cfg.norm, self.data.num_classes,
                                  self.cfg.shortcut, self.cfg.zero_init_residual)
        self.layers = norm_layers(self.model)
        ghost = self.cfg.virtual_gpus > 1 and not self.cfg.sync_bn  # --sync-bn: BN over all K*N
        set_chunk_size(self.model, self.cfg.batch_size if ghost else None)
        self.renorm = renorm_layers(self.model)  # Batch Renorm: r_max / d_max set before every step
        self.renorm_limits: tuple[float, float] | None = None
        self.precise_images = self.precise_bn_images()
        # channels_last speeds up BN's kernels on CPU and CUDA, but GN's kernels are NCHW-only
        # on CUDA and much slower in channels_last on CPU (see benchmarks/): BN and BRN only.
        self.channels_last = (opts.channels_last if opts.channels_last is not None
                              else parse_norm(self.cfg.norm).channels_last)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=memory_format)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.forward = torch.compile(self.model) if opts.compile else self.model
        self.amp, self.amp_reason = choose_amp(self.device, opts.amp)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.amp \
            else contextlib.nullcontext
        self.normalize = Normalizer(self.data.mean, self.data.std, self.device)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        # Resumable state: epochs finished, steps into the current epoch and its data order.
        self.epoch, self.step, self.order = 0, 0, None
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, wrong, n
        self.epoch_seconds = 0.0
        self.rows: list[dict] = []
        self.resume_state: dict | None = None  # read by open(), applied by run()

    def set_renorm_limits(self) -> None:
        """Batch Renorm's r_max and d_max at this step (a function of the step alone, so a
        resumed run continues exactly); the layers are touched only when the values change."""
        cfg = self.cfg
        limits = cfg.renorm_ramp().limits((self.epoch * self.steps + self.step) / (cfg.epochs * self.steps))
        if limits != self.renorm_limits:
            for layer in self.renorm:
                layer.set_limits(*limits)
            self.renorm_limits = limits

    def precise_bn_images(self) -> int:
        """PreciseBN's number of images: --precise-bn M rounded down to whole device batches."""
        m, n = self.cfg.precise_bn, self.cfg.batch_size
        if m and not n <= m <= len(self.data.train):
            raise NormlabError(f"--precise-bn {m} needs between {n} (one device batch) and "
                               f"{len(self.data.train)} (the training set) images")
        return m // n * n

    def precise_batches(self):
        """PreciseBN's inputs: training images chosen and augmented from the run's seed and the
        epoch (never from the training generator), in the training step's batches."""
        seed = int(np.random.SeedSequence([self.cfg.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.data.train), generator=generator)[:self.precise_images]
        for start in range(0, len(order), self.cfg.images_per_step):
            index = order[start:start + self.cfg.images_per_step].to(self.device)
            x = self.normalize(augment(self.data.train.images[index], generator))
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- the run directory -------------------------------------------------------------
    def describe(self) -> dict:
        data = self.data
        return {
            "run_id": self.cfg.run_id(), "config": self.cfg.to_dict(), "lr": self.cfg.lr,
            "images_per_step": self.cfg.images_per_step, "steps_per_epoch": self.steps,
            "batch_semantics": distributed.batch_semantics(self.cfg, self.dist),
            "execution": self.dist.execution(self.cfg),
            "norm_layers": self.layers,
            **({"precise_bn_images": self.precise_images} if self.precise_images else {}),
            **({"batch_renorm_ramp": dataclasses.asdict(self.cfg.renorm_ramp())} if self.renorm else {}),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "data": {"name": data.name, "location": data.location, "train": len(data.train),
                     "val": len(data.val) if data.val is not None else 0, "test": len(data.test),
                     "mean": data.mean, "std": data.std},
            "device": str(self.device) if self.device.type == "cpu"
            else f"{self.device} ({torch.cuda.get_device_name(self.device)})",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "normlab": __version__,
            "speed_options": {"channels_last": self.channels_last, "compile": self.opts.compile,
                              "amp": self.amp, "amp_reason": self.amp_reason},
        }

    def write_status(self, state: str, **extra) -> dict:
        status = {"state": state, "run_id": self.cfg.run_id(), "epoch": self.epoch,
                  "epochs": self.cfg.epochs, "summary": rundir.summarize(self.rows),
                  "updated": datetime.datetime.now().isoformat(timespec="seconds"), **extra}
        if self.dist.writer:
            rundir.write_json(self.dir / rundir.STATUS, status)
        return status

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step": self.step, "order": self.order,
            "sums": self.sums.cpu(), "epoch_seconds": self.epoch_seconds, "rows": self.rows,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(), "numpy_rng": checkpoint.numpy_state(),
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> None:
        self.dist.average_buffers(self.model)  # so that every rank resumes from the same statistics
        if not self.dist.writer:
            return
        checkpoint.save(self.dir / rundir.CHECKPOINT, self.state_dict())

    def load_checkpoint(self) -> bool:
        """Restore the state that open() read and verified, if there was a checkpoint (ranks
        other than 0 do not open the directory: they read rank 0's checkpoint here)."""
        state, self.resume_state = self.resume_state, None
        path = self.dir / rundir.CHECKPOINT
        if state is None and not self.dist.writer and path.exists():
            state = checkpoint.load(path)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.order = state["epoch"], state["step"], state["order"]
        self.sums = state["sums"].to(self.device)
        self.epoch_seconds, self.rows = state["epoch_seconds"], state["rows"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        checkpoint.set_numpy_state(state["numpy_rng"])
        return True

    def open(self, force: bool = False) -> "rundir.RunLock":
        """Create or reopen the run directory, holding its lock. Refuses a different config."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NormlabError(f"cannot create {self.dir} ({err.strerror}); choose a writable --out") from None
        lock = rundir.RunLock(self.dir)
        if not lock.acquire():
            raise RunBusy(str(self.dir))
        rundir.remove_stale_temps(self.dir)  # left by a killed writer; we hold the lock
        existing = rundir.read_json(self.dir / rundir.CONFIG)
        problem = None
        if existing and existing.get("config") != self.cfg.to_dict():
            changes = "; ".join(config_diff(existing.get("config") or {}, self.cfg.to_dict()))
            problem = (f"{self.dir} holds a run with a different config ({changes}); use another "
                       f"--out, or --force to start afresh (the old run is kept aside)")
        else:
            try:  # read and verify the checkpoint now, before anything is written
                path = self.dir / rundir.CHECKPOINT
                self.resume_state = checkpoint.load(path) if path.exists() else None
            except NormlabError as err:
                problem = str(err)
        if problem is None:
            return lock
        lock.release()
        if not force:
            raise NormlabError(problem)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir.rename(self.dir.with_name(f"{self.dir.name}.old-{stamp}"))
        return self.open()

    # -- training -----------------------------------------------------------------------
    def train_step(self, index: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on the training images at `index` (on the device); returns the batch's
        mean loss and number of errors as device tensors (reading them would sync).
        Under torchrun `index` is the whole step's; this rank trains on its part of it."""
        offsets, flips = draw_augmentation(len(index), self.generator)  # the whole step's numbers
        part = self.dist.part(len(index))
        index, offsets, flips = index[part], offsets[:, part], flips[part]
        x = self.normalize(apply_augmentation(self.data.train.images[index], offsets, flips))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.data.train.labels[index]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            out = self.forward(x)
            loss = F.cross_entropy(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (out.argmax(1) != y).sum()

    def train_epoch(self, on_progress=None) -> None:
        cfg = self.cfg
        if self.order is None:
            self.order = torch.randperm(len(self.data.train), generator=self.generator)
        self.model.train()
        per_step = cfg.images_per_step
        per_rank = per_step // self.dist.world
        count = torch.tensor(float(per_rank), dtype=torch.float64, device=self.device)
        start = last_save = time.perf_counter()
        seconds_before = self.epoch_seconds
        while self.step < self.steps:
            index = self.order[self.step * per_step:(self.step + 1) * per_step].to(self.device)
            if self.renorm:
                self.set_renorm_limits()
            loss, wrong = self.train_step(index, cfg.lr_at(self.epoch + self.step / self.steps))
            if self.renorm:  # BRN's running statistics feed its next step: one copy, as one process's
                self.dist.average_buffers(*self.renorm)  # chunks share (averaged) under --virtual-gpus
            minutes = self.opts.checkpoint_minutes
            with torch.no_grad():  # summed over ranks: every rank holds the whole step's numbers;
                # a signal to one rank stops them all, one rank's clock checkpoints them all
                step_sums, stop, save = self.dist.reduce_step(
                    torch.stack([loss.double() * per_rank, wrong.double(), count]), STOP.is_set(),
                    bool(minutes) and time.perf_counter() - last_save > 60 * minutes)
                self.sums += step_sums
            self.step += 1
            self.epoch_seconds = seconds_before + time.perf_counter() - start
            if self.step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(self.sums[0]):
                break
            if on_progress is not None:
                on_progress(self)
            if self.step == self.steps:
                break
            if stop:
                self.save_checkpoint()
                self.write_status("interrupted")
                raise Interrupted(str(self.dir))
            if save:
                self.save_checkpoint()  # within a long epoch, so that preemption loses little
                last_save = time.perf_counter()

    def finish_epoch(self) -> dict:
        """Evaluate, then the epoch's metrics row (train numbers from the epoch's sums)."""
        loss_sum, wrong, n = self.sums.tolist()
        eval_start = time.perf_counter()
        self.dist.average_buffers(self.model)  # per-rank BN running statistics -> their mean
        row = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum / n, "train_error": 100.0 * wrong / n}
        with (precise_statistics(self.model, self.precise_batches(), self.autocast) if self.precise_images
              else contextlib.nullcontext()):  # every rank computes the same (same images, weights)
            if self.data.val is not None:
                row["val_loss"], row["val_error"] = evaluate(
                    self.model, self.data.val, self.normalize, self.opts.eval_batch_size, self.autocast,
                    self.dist)
            row["test_loss"], row["test_error"] = evaluate(
                self.model, self.data.test, self.normalize, self.opts.eval_batch_size, self.autocast, self.dist)
        row["seconds"] = self.epoch_seconds + time.perf_counter() - eval_start
        row["images_per_s"] = n / self.epoch_seconds if self.epoch_seconds else float("nan")
        return row

    def run(self, on_progress=None, on_epoch=None) -> dict:
        """Train to the last epoch from wherever the checkpoint left off. Returns the status."""
        status = rundir.read_json(self.dir / rundir.STATUS)
        with self.dist.agreed():  # under torchrun every rank resumes from rank 0's checkpoint
            resumed = self.load_checkpoint()
        self.dist.check_same({"checkpoint (found, epoch, step)": (resumed, self.epoch, self.step)})
        if resumed and status and status.get("state") in rundir.FINISHED:
            return status
        if resumed and self.dist.writer:  # a kill between checkpoint and metrics.csv leaves it behind
            rundir.write_metrics(self.dir / rundir.METRICS, self.rows)
        if self.dist.writer:
            rundir.write_json(self.dir / rundir.CONFIG, self.describe())
        self.write_status("running")
        try:
            while self.epoch < self.cfg.epochs:
                self.train_epoch(on_progress)
                if not torch.isfinite(self.sums[0]):  # the sums are the same on every rank
                    return self.write_status("diverged", diverged_in_epoch=self.epoch + 1)
                row = self.finish_epoch()
                self.rows.append(row)
                self.epoch, self.step, self.order = self.epoch + 1, 0, None
                self.sums.zero_()
                self.epoch_seconds = 0.0
                self.save_checkpoint()
                if self.dist.writer:
                    rundir.write_metrics(self.dir / rundir.METRICS, self.rows)
                self.write_status("running")
                if on_epoch is not None:
                    on_epoch(self, row)
                if self.dist.agree(STOP.is_set())[0] and self.epoch < self.cfg.epochs:
                    self.write_status("interrupted")
                    raise Interrupted(str(self.dir))
        except (Interrupted, NormlabError):
            raise
        except Exception as err:
            self.write_status("failed", error=f"{type(err).__name__}: {err}")
            raise
        return self.write_status("done", wall_seconds=sum(r["seconds"] for r in self.rows))


def train(cfg: RunConfig, run_dir: str | Path, opts: RuntimeOptions | None = None, *,
          force: bool = False, on_progress=None, on_epoch=None) -> dict:
    """Train (or resume, or skip if finished) the run `cfg` in `run_dir`; return its status."""
    run = Run(cfg, Path(run_dir), opts or RuntimeOptions())
    with run.open(force=force):
        return run.run(on_progress, on_epoch)
