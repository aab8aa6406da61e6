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

import torch
import torch.nn.functional as F

from .. import probes, rundir
from ..config import RunConfig, RuntimeOptions
from ..data import Dataset, Normalizer, apply_augmentation, draw_augmentation, load_dataset
from ..errors import NormlabError
from ..loggers import Loggers
from ..norms import norm_layers, parse_norm, renorm_layers
from ..precision import choose_amp
from . import fast, memory, ranks
from .array import Network
from .build import build_optimizer, initial_model, resolve_device, set_deterministic
from .control import STOP, Interrupted
from .directories import RunFiles
from .evaluation import Evaluation
from .state import Member, position

DIVERGENCE_CHECK_STEPS = 100


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


class Trainer(Evaluation, RunFiles):
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
        set_deterministic(opts.deterministic)  # before anything touches CUDA (cuBLAS reads it once)
        self.device = resolve_device(opts.device)
        fast.check(opts.fast_path, self.device, opts.compile, group.world)
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
        self.probes = opts.probes if opts.probes is not None else probes.by_default(
            self.cfg.epochs, len(self.data.train), len(self.data.test))
        # Resumable position, shared by the array: epochs finished, steps into the current epoch.
        self.epoch, self.step = 0, 0
        self.epoch_seconds = 0.0
        if self.device.type == "cuda":  # a batch the GPU cannot hold is bad input: refused here
            memory.probe(self)
        for member in self.members:  # checked against every checkpoint before it is used
            member.expected = self.expected(member)

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
        if self.opts.fast_path == "compile":
            self.forward = torch.compile(self.model, mode="reduce-overhead")
        self.graph_step = fast.GraphStep(self) if self.opts.fast_path == "graph" else None

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
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.graph_step is not None:
            losses, wrong = self.graph_step(index, offsets, flips, lr)
        else:
            if self.opts.fast_path == "compile":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are read
            losses, wrong = self.compute_step(index, offsets, flips, self.optimizer.step)
        return list(losses.unbind()), list(wrong.unbind())

    def compute_step(self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, update,
                     autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's work on the device: gather and augment the images at `index` (every run's,
        this rank's part), forward, backward and `update` (the optimizer's step); returns each
        run's mean loss [R] and error count [R]. The whole of it is what --fast-path graph captures."""
        x = self.normalize(apply_augmentation(self.data.train.images[index], offsets, flips))
        y = self.data.train.labels[index]
        if self.runs > 1:  # [R*N, 3, H, W] -> [N, 3R, H, W]: run r's images in channels 3r..3r+2
            n = x.shape[0] // self.runs
            x = x.view(self.runs, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (autocast or self.autocast)():
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
        update()
        wrong = (out.argmax(1) != y).view(self.runs, -1).sum(1)
        return losses.detach(), wrong

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
            lr = cfg.lr_at(self.epoch + self.step / self.steps, self.steps)
            losses, wrongs = self.train_step(indices, lr)
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
            self.log_step(step_sums, lr)
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

    def log_step(self, step_sums: torch.Tensor, lr: float) -> None:
        """--log: the step's training loss (all ranks') and lr, every --log-every steps; the
        loss is read (a device sync) only then."""
        step = self.epoch * self.steps + self.step
        if any(m.loggers.due(step) for m in self.members):
            for member, (loss, _, n) in zip(self.members, step_sums.view(self.runs, 3).tolist()):
                if member.loggers.due(step):
                    member.loggers.step(step, {"train_loss": loss / n, "lr": lr})

    def end_logging(self, state: str) -> None:
        for member in self.members:
            member.loggers.finish(state, member.rows)

    def diverged(self) -> list[int]:
        """The runs whose loss became NaN or infinite (the sums are the same on every rank)."""
        return [r for r, m in enumerate(self.members) if not torch.isfinite(m.sums[0])]

    def leave(self, diverged: list[int]) -> list[dict]:
        """Record diverged runs as such and train on without them (their earlier epochs stay)."""
        statuses = [self.members[r].write_status("diverged", self.epoch, diverged_in_epoch=self.epoch + 1)
                    for r in diverged]
        for r in diverged:
            self.members[r].loggers.finish("diverged", self.members[r].rows)
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
            # --log: each run logs as itself (rank 0 only), from the checkpoint's step on
            member.loggers = Loggers(self.opts.log, member.cfg.to_dict(), member.dir, self.dist.writer)
            member.loggers.start(self.epoch * self.steps + self.step, member.rows)
        self.write_status("running")
        if self.probes and (self.epoch, self.step) == (0, 0):
            self.take_probes()  # at initialization
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
                if self.probes:
                    self.take_probes()
                self.epoch_seconds = 0.0
                self.save_checkpoint()
                for member, row in zip(self.members, rows):
                    member.write_metrics()
                    member.loggers.epoch(row["epoch"], row)
                self.write_status("running")
                if on_epoch is not None:
                    for member, row in zip(self.members, rows):
                        on_epoch(self, member, row)
                if self.dist.agree(STOP.is_set())[0] and self.epoch < self.cfg.epochs:
                    self.write_status("interrupted")
                    raise Interrupted(self.where())
        except Interrupted:
            self.end_logging("interrupted")
            raise
        except NormlabError:
            self.end_logging("failed")
            raise
        except torch.cuda.OutOfMemoryError:  # memory.probe passed, yet memory ran out
            error = memory.message(self, f"epoch {self.epoch + 1}")
            self.write_status("failed", error=error)
            raise NormlabError(error) from None
        except Exception as err:
            self.write_status("failed", error=f"{type(err).__name__}: {err}")
            self.end_logging("failed")
            raise
        for member in self.members:
            results[member.run_id] = member.write_status(
                "done", self.epoch, wall_seconds=sum(r["seconds"] for r in member.rows))
        self.end_logging("done")
        return results
