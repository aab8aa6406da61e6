"""The run directories of an array (Trainer's share, as a mixin): config.json, status, the
checkpoints written, read, verified and restored, opening and releasing the directories."""
from __future__ import annotations

import dataclasses

import torch

from .. import __version__, checkpoint, rundir
from ..errors import NormlabError
from . import fast, ranks
from .build import build_optimizer
from .control import RunBusy
from .state import Member, align, drop_previous, position, restore_globals, save_checkpoints


class RunFiles:
    """What a Trainer keeps on disk: each run's directory, status and checkpoint."""

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
                              "amp": self.amp, "amp_reason": self.amp_reason,
                              "deterministic": self.opts.deterministic, "fast_path": self.opts.fast_path},
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
        if self.graph_step is not None:  # the loaded optimizer state is new tensors: capture again
            self.graph_step = fast.GraphStep(self)
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
