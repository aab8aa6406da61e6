"""The training loop, over an array of runs: build, train, evaluate, checkpoint and resume.

A lone run is an array of one. R runs whose configs differ only in the seed train as one
network (array.py) in lockstep: each step every run takes its own batch (its own data order and
augmentation), the network takes all of them at once, and each run's loss, metrics, divergence
check, checkpoint and run directory stay its own (state.py).

The data set lives on the training device as uint8; every step gathers each run's batch,
augments it there (data.augment) and takes one SGD step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, checkpoint, rundir
from ..config import RunConfig, RuntimeOptions
from ..data import Dataset, Normalizer, apply_augmentation, augment, draw_augmentation, load_dataset
from ..errors import NormlabError
from ..norms import norm_layers, parse_norm, precise_statistics, renorm_layers
from ..precision import choose_amp
from . import ranks
from .array import Network
from .build import build_optimizer, initial_model, resolve_device
from .control import STOP, Interrupted, RunBusy
from .state import Member, align, drop_previous, position, restore_globals, save_checkpoints

DIVERGENCE_CHECK_STEPS = 100


def evaluate(network: Network, split, normalize, batch_size: int, autocast,
             group: ranks.Single = ranks.SINGLE) -> list[tuple[float, float]]:
    """Each run's mean loss and error (%) on a split, in eval mode (BN uses its running
    statistics). Under torchrun each rank evaluates its share and the sums are added up."""
    network.model.eval()
    share = group.shard(len(split))
    images, labels = split.images[share], split.labels[share]
    sums = torch.zeros(network.runs, 2, dtype=torch.float64, device=split.images.device)
    with torch.inference_mode(), autocast():
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start:start + batch_size])
            y = labels[start:start + batch_size]
            for r, out in enumerate(network.split(network.model(network.repeat(x)))):
                out = out.float()
                sums[r, 0] += F.cross_entropy(out, y, reduction="sum").double()
                sums[r, 1] += (out.argmax(1) != y).sum()
    n = len(split)
    return [(loss / n, 100.0 * wrong / n) for loss, wrong in group.sum(sums).tolist()]


def check_array(cfgs: list[RunConfig]) -> None:
    """An array holds runs that differ only in their seeds."""
    first = dataclasses.replace(cfgs[0], seed=0)
    for cfg in cfgs[1:]:
        if dataclasses.replace(cfg, seed=0) != first:
            raise NormlabError(f"runs {cfgs[0].run_id()} and {cfg.run_id()} differ in more than the seed, "
                               f"so they cannot train as one array")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise NormlabError(f"an array needs distinct seeds, got {seeds}")


class Trainer:
    """The runs `cfgs` (one, or several differing only in the seed) being trained in `run_dirs`.
    Use train() / train_array() in this package unless you need the pieces."""

    def __init__(self, cfgs: list[RunConfig], run_dirs: list, opts: RuntimeOptions,
                 group: ranks.Single = ranks.SINGLE):
        cfgs = [c.normalized().validate() for c in cfgs]
        check_array(cfgs)
        self.cfg = cfgs[0]  # everything but the seed is every run's
        self.opts = opts
        self.dist = group  # torchrun: this process's rank; collectives are no-ops in one process
        if group.world > 1 and len(cfgs) > 1:
            raise NormlabError("a run array trains in one process; under torchrun train one seed at a time")
        self.device = resolve_device(opts.device)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        # Everything that can fail on bad input fails here, before any run directory exists.
        self.data: Dataset = load_dataset(self.cfg.data, opts.data_dir, self.cfg.val_split).to(self.device)
        self.steps = len(self.data.train) // self.cfg.images_per_step
        if self.steps == 0:
            raise NormlabError(f"one step needs {self.cfg.images_per_step} images ({self.cfg.virtual_gpus} "
                               f"devices x {self.cfg.batch_size}) but the training set has "
                               f"{len(self.data.train)}; lower --batch-size, or the number of devices "
                               f"(--virtual-gpus, or torchrun's --nproc_per_node)")
        self.members = [Member(c, d, self.device, group.writer) for c, d in zip(cfgs, run_dirs)]
        self.refused: dict[str, dict] = {}  # run id -> status of runs left out by open()
        self.layers = None
        self.precise_images = self.precise_bn_images()
        # channels_last speeds up BN's kernels on CPU and CUDA, but GN's kernels are NCHW-only
        # on CUDA and much slower in channels_last on CPU (see benchmarks/): BN and BRN only.
        self.channels_last = (opts.channels_last if opts.channels_last is not None
                              else parse_norm(self.cfg.norm).channels_last)
        self.assemble([initial_model(c, self.data.num_classes) for c in cfgs])
        self.amp, self.amp_reason = choose_amp(self.device, opts.amp)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.amp \
            else contextlib.nullcontext
        self.normalize = Normalizer(self.data.mean, self.data.std, self.device)
        # Resumable position, shared by the array: epochs finished, steps into the current epoch.
        self.epoch, self.step = 0, 0
        self.epoch_seconds = 0.0
        for member in self.members:  # checked against every checkpoint before it is used
            member.expected = self.expected(member)

    def expected(self, member: Member) -> checkpoint.Expected:
        """What a checkpoint of `member` must hold: its lone state as built, before training."""
        lone = self.network.template
        optimizer = build_optimizer(lone, member.cfg)
        val = ("val_loss", "val_error") if self.data.val is not None else ()
        return checkpoint.Expected(
            template=member.state_dict(lone.state_dict(), optimizer.state_dict(), 0, 0, 0.0, [member.run_id]),
            params=[tuple(p.shape) for group in optimizer.param_groups for p in group["params"]],
            epochs=member.cfg.epochs, steps=self.steps, images=len(self.data.train),
            columns=("epoch", "lr", "train_loss", "train_error", *val, "test_loss", "test_error", "seconds",
                     "images_per_s"))

    def assemble(self, lone_models: list, optimizer_states: list[dict] | None = None) -> None:
        """The network, optimizer and per-layer handles for these runs' models."""
        self.network = Network(lone_models)
        self.model = self.network.model
        self.layers = self.layers or norm_layers(lone_models[0])
        self.renorm = renorm_layers(self.model)  # Batch Renorm: r_max / d_max set before every step
        self.renorm_limits: tuple[float, float] | None = None
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=memory_format)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.network.bind(self.optimizer)
        if optimizer_states is not None:
            self.optimizer.load_state_dict(self.network.stack_optimizer_states(optimizer_states))
        self.forward = torch.compile(self.model) if self.opts.compile else self.model

    @property
    def runs(self) -> int:
        return len(self.members)

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
        """PreciseBN's inputs: training images chosen and augmented from each run's seed and the
        epoch (never from the training generators), in the training step's batches."""
        generators, orders = [], []
        for member in self.members:
            seed = int(np.random.SeedSequence([member.cfg.seed, self.epoch]).generate_state(1)[0])
            generators.append(torch.Generator().manual_seed(seed))
            orders.append(torch.randperm(len(self.data.train), generator=generators[-1])[:self.precise_images])
        for start in range(0, self.precise_images, self.cfg.images_per_step):
            xs = []
            for order, generator in zip(orders, generators):
                index = order[start:start + self.cfg.images_per_step].to(self.device)
                xs.append(self.normalize(augment(self.data.train.images[index], generator)))
            x = self.network.join(xs)
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- run directories -------------------------------------------------------------------
    def describe(self, member: Member) -> dict:
        data = self.data
        execution = self.dist.execution(self.cfg)
        if self.runs > 1:
            execution["array"] = {"runs": self.runs, "members": [m.run_id for m in self.members]}
        return {
            "run_id": member.run_id, "config": member.cfg.to_dict(), "lr": self.cfg.lr,
            "images_per_step": self.cfg.images_per_step, "steps_per_epoch": self.steps,
            "batch_semantics": ranks.batch_semantics(self.cfg, self.dist),
            "execution": execution,
            "norm_layers": self.layers,
            **({"precise_bn_images": self.precise_images} if self.precise_images else {}),
            **({"batch_renorm_ramp": dataclasses.asdict(self.cfg.renorm_ramp())} if self.renorm else {}),
            "parameters": sum(p.numel() for p in self.network.template.parameters()),
            "data": {"name": data.name, "location": data.location, "train": len(data.train),
                     "val": len(data.val) if data.val is not None else 0, "test": len(data.test),
                     "mean": data.mean, "std": data.std},
            "device": str(self.device) if self.device.type == "cpu"
            else f"{self.device} ({torch.cuda.get_device_name(self.device)})",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "normlab": __version__,
            "speed_options": {"channels_last": self.channels_last, "compile": self.opts.compile,
                              "amp": self.amp, "amp_reason": self.amp_reason},
        }

    def write_status(self, state: str, **extra) -> list[dict]:
        return [m.write_status(state, self.epoch, **extra) for m in self.members]

    def save_checkpoint(self) -> None:
        self.dist.average_buffers(self.model)  # so that every rank resumes from the same statistics
        if not self.dist.writer:
            return
        optimizer = self.optimizer.state_dict()
        ids = [m.run_id for m in self.members]
        states = [m.state_dict(self.network.state(r), self.network.optimizer_state(optimizer, r),
                               self.epoch, self.step, self.epoch_seconds, ids)
                  for r, m in enumerate(self.members)]
        save_checkpoints(self.members, states)

    def read_checkpoints(self) -> None:
        """Ranks other than 0 do not open the run directory: they read rank 0's checkpoint."""
        member = self.members[0]
        path = member.dir / rundir.CHECKPOINT
        if member.resume_state is None and not self.dist.writer and path.exists():
            member.resume_state = member.read_checkpoint(path)

    def load_checkpoints(self) -> bool:
        """Restore what open() read and verified, if there was a checkpoint; every run of the
        array is at the same position."""
        states = [m.resume_state for m in self.members]
        for m in self.members:
            m.resume_state = None
        if states[0] is None:
            return False
        self.network.load([s["model"] for s in states])
        self.optimizer.load_state_dict(self.network.stack_optimizer_states([s["optimizer"] for s in states]))
        self.epoch, self.step = position(states[0])
        self.epoch_seconds = states[0]["epoch_seconds"]
        for m, state in zip(self.members, states):
            m.restore(state)
        restore_globals(states[0])
        return True

    def open(self, force: bool = False, tolerant: bool = False) -> None:
        """Open (and lock) every run's directory and read its checkpoint. Runs of an array killed
        while it wrote their checkpoints are brought back to the same step (state.align).
        tolerant: a run that another process holds, or whose directory is refused, is left out
        (its status says why) and the others train; else that is every run's error."""
        opened = []
        try:
            for member in self.members:
                try:
                    member.open(force)
                    opened.append(member)
                except RunBusy:
                    if not tolerant:
                        raise
                    self.refused[member.run_id] = {"state": "busy"}
                except NormlabError as err:
                    if not tolerant:
                        raise
                    self.refused[member.run_id] = {"state": "failed", "error": str(err)}
        except BaseException:
            for member in opened:
                member.release()
            raise
        if len({position(m.resume_state) for m in opened}) <= 1:
            drop_previous(opened)  # the last array checkpoint was written whole
        else:
            align(opened)

    def release(self) -> None:
        for member in self.members:
            member.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    # -- training ----------------------------------------------------------------------------
    def train_step(self, indices: list[torch.Tensor], lr: float) -> tuple[list, list]:
        """One SGD step, each run on its training images at its `indices` (on the device);
        returns each run's mean loss and number of errors as device tensors (reading them would
        sync). Under torchrun the indices are the whole step's; this rank trains on its part."""
        draws = [draw_augmentation(len(index), m.generator) for m, index in zip(self.members, indices)]
        part = self.dist.part(len(indices[0]))  # every run's draws are for the whole step
        index = torch.cat([i[part] for i in indices])
        offsets = torch.cat([o[:, part] for o, _ in draws], dim=1)
        flips = torch.cat([f[part] for _, f in draws])
        x = self.normalize(apply_augmentation(self.data.train.images[index], offsets, flips))
        y = self.data.train.labels[index]
        if self.runs > 1:  # [R*N, 3, H, W] -> [N, 3R, H, W]: run r's images in channels 3r..3r+2
            n = x.shape[0] // self.runs
            x = x.view(self.runs, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            out = self.forward(x)
            if self.runs > 1:  # [N, R*classes] -> [R*N, classes], the order of y
                out = out.view(out.shape[0], self.runs, -1).transpose(0, 1).reshape(-1, out.shape[1] // self.runs)
            if self.runs == 1:
                loss = F.cross_entropy(out.float(), y)
                losses = loss.view(1)
            else:
                losses = F.cross_entropy(out.float(), y, reduction="none").view(self.runs, -1).mean(1)
                loss = losses.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        wrong = (out.argmax(1) != y).view(self.runs, -1).sum(1)
        return list(losses.detach().unbind()), list(wrong.unbind())

    def train_epoch(self, on_progress=None) -> None:
        cfg = self.cfg
        for member in self.members:
            if member.order is None:
                member.order = torch.randperm(len(self.data.train), generator=member.generator)
        self.model.train()
        per_step = cfg.images_per_step
        per_rank = per_step // self.dist.world
        count = torch.tensor(float(per_rank), dtype=torch.float64, device=self.device)
        start = last_save = time.perf_counter()
        seconds_before = self.epoch_seconds
        while self.step < self.steps:
            window = slice(self.step * per_step, (self.step + 1) * per_step)
            indices = [m.order[window].to(self.device) for m in self.members]
            if self.renorm:
                self.set_renorm_limits()
            losses, wrongs = self.train_step(indices, cfg.lr_at(self.epoch + self.step / self.steps))
            if self.renorm:  # BRN's running statistics feed its next step: one copy, as one process's
                self.dist.average_buffers(*self.renorm)  # chunks share (averaged) under --virtual-gpus
            minutes = self.opts.checkpoint_minutes
            with torch.no_grad():  # summed over ranks: every rank holds the whole step's numbers;
                # a signal to one rank stops them all, one rank's clock checkpoints them all
                step = torch.stack([torch.stack([loss.double() * per_rank, wrong.double(), count])
                                    for loss, wrong in zip(losses, wrongs)])
                step_sums, stop, save = self.dist.reduce_step(
                    step if self.runs > 1 else step[0], STOP.is_set(),
                    bool(minutes) and time.perf_counter() - last_save > 60 * minutes)
                for member, sums in zip(self.members, step_sums.view(self.runs, 3)):
                    member.sums += sums
            self.step += 1
            self.epoch_seconds = seconds_before + time.perf_counter() - start
            if self.step % DIVERGENCE_CHECK_STEPS == 0 and self.diverged():
                break
            if on_progress is not None:
                on_progress(self)
            if self.step == self.steps:
                break
            if stop:
                self.save_checkpoint()
                self.write_status("interrupted")
                raise Interrupted(self.where())
            if save:
                self.save_checkpoint()  # within a long epoch, so that preemption loses little
                last_save = time.perf_counter()

    def where(self) -> str:
        """The run directory, or directories, of this training (for messages)."""
        if self.runs == 1:
            return str(self.members[0].dir)
        return f"{self.runs} run directories under {self.members[0].dir.parent}"

    def diverged(self) -> list[int]:
        """The runs whose loss became NaN or infinite (the sums are the same on every rank)."""
        return [r for r, m in enumerate(self.members) if not torch.isfinite(m.sums[0])]

    def leave(self, diverged: list[int]) -> list[dict]:
        """Record diverged runs as such and train on without them (their earlier epochs stay)."""
        statuses = [self.members[r].write_status("diverged", self.epoch, diverged_in_epoch=self.epoch + 1)
                    for r in diverged]
        keep = [r for r in range(self.runs) if r not in diverged]
        for r in diverged:
            self.members[r].release()
        if keep:
            optimizer = self.optimizer.state_dict()
            models = [self.network.lone_model(r) for r in keep]
            optimizers = [self.network.optimizer_state(optimizer, r) for r in keep]
            self.members = [self.members[r] for r in keep]
            self.assemble(models, optimizers)
            for member in self.members:  # config.json says how the run trains from now on
                if self.dist.writer:
                    rundir.write_json(member.dir / rundir.CONFIG, self.describe(member))
        else:
            self.members = []
        return statuses

    def finish_epoch(self) -> list[dict]:
        """Evaluate, then each run's metrics row (train numbers from the epoch's sums)."""
        eval_start = time.perf_counter()
        self.dist.average_buffers(self.model)  # per-rank BN running statistics -> their mean
        rows = []
        for member in self.members:
            loss_sum, wrong, n = member.sums.tolist()
            rows.append({"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                         "train_loss": loss_sum / n, "train_error": 100.0 * wrong / n})
        with (precise_statistics(self.model, self.precise_batches(), self.autocast) if self.precise_images
              else contextlib.nullcontext()):  # every rank computes the same (same images, weights)
            if self.data.val is not None:
                for row, (loss, error) in zip(rows, evaluate(self.network, self.data.val, self.normalize,
                                                             self.opts.eval_batch_size, self.autocast, self.dist)):
                    row["val_loss"], row["val_error"] = loss, error
            for row, (loss, error) in zip(rows, evaluate(self.network, self.data.test, self.normalize,
                                                         self.opts.eval_batch_size, self.autocast, self.dist)):
                row["test_loss"], row["test_error"] = loss, error
        seconds = self.epoch_seconds + time.perf_counter() - eval_start
        for member, row in zip(self.members, rows):
            row["seconds"] = seconds
            row["images_per_s"] = member.sums[2].item() / self.epoch_seconds if self.epoch_seconds else float("nan")
        return rows

    def run(self, on_progress=None, on_epoch=None) -> dict[str, dict]:
        """Train every run to the last epoch from wherever its checkpoint left off; finished runs
        are left as they are. Returns each run's status by run id."""
        with self.dist.agreed():  # under torchrun every rank resumes from rank 0's checkpoint
            self.read_checkpoints()
        results, pending = dict(self.refused), []
        for member in self.members:
            if member.run_id in self.refused:
                continue
            status = member.status()
            if member.resume_state is not None and status and status.get("state") in rundir.FINISHED:
                results[member.run_id] = status
            else:
                pending.append(member)
        by_position: dict[tuple, list[Member]] = {}
        for member in pending:  # runs at different steps (see state.align) train apart
            by_position.setdefault(position(member.resume_state), []).append(member)
        for members in by_position.values():
            results.update(self.train_members(members, on_progress, on_epoch))
        return results

    def train_members(self, members: list[Member], on_progress=None, on_epoch=None) -> dict[str, dict]:
        if members != self.members:
            self.members = members
            self.assemble([initial_model(m.cfg, self.data.num_classes) for m in members])
        self.epoch, self.step, self.epoch_seconds = 0, 0, 0.0
        resumed = self.load_checkpoints()
        self.dist.check_same({"checkpoint (found, epoch, step)": (resumed, self.epoch, self.step)})
        results: dict[str, dict] = {}
        for member in self.members:
            if resumed:  # a kill between checkpoint and metrics.csv leaves it behind
                member.write_metrics()
            if self.dist.writer:
                rundir.write_json(member.dir / rundir.CONFIG, self.describe(member))
        self.write_status("running")
        try:
            while self.members and self.epoch < self.cfg.epochs:
                self.train_epoch(on_progress)
                diverged = self.diverged()
                if diverged:
                    results.update({s["run_id"]: s for s in self.leave(diverged)})
                    if self.step < self.steps or not self.members:  # the others finish the epoch
                        continue
                rows = self.finish_epoch()
                for member, row in zip(self.members, rows):
                    member.rows.append(row)
                    member.order = None
                    member.sums.zero_()
                self.epoch, self.step = self.epoch + 1, 0
                self.epoch_seconds = 0.0
                self.save_checkpoint()
                for member in self.members:
                    member.write_metrics()
                self.write_status("running")
                if on_epoch is not None:
                    for member, row in zip(self.members, rows):
                        on_epoch(self, member, row)
                if self.dist.agree(STOP.is_set())[0] and self.epoch < self.cfg.epochs:
                    self.write_status("interrupted")
                    raise Interrupted(self.where())
        except (Interrupted, NormlabError):
            raise
        except Exception as err:
            self.write_status("failed", error=f"{type(err).__name__}: {err}")
            raise
        for member in self.members:
            results[member.run_id] = member.write_status(
                "done", self.epoch, wall_seconds=sum(r["seconds"] for r in member.rows))
        return results
