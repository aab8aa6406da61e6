"""Each run's own state and directory: its lock, its data order and random numbers, its sums and
metrics, its checkpoint (written, verified, resumed) and its status.

A run keeps this whether it trains alone or in an array, so that its checkpoint has the same
form either way and resumes either way. Random numbers for data order and augmentation come
from the run's own generator, saved in every checkpoint with the process's global generators,
so a resumed run continues exactly as if it had never stopped (bit-identical on CPU).

An array writes its runs' checkpoints one after another. So that a kill between two of them
cannot leave the runs at different steps (after which no rerun could reproduce the array), each
run's previous checkpoint stays, hard-linked as checkpoint.prev.pt, until every run of the array
has its new one; a rerun that finds its runs at different steps takes those ahead back to it.
"""
from __future__ import annotations

import datetime
import os
import random
from pathlib import Path

import torch

from .. import checkpoint, probes, rundir
from ..config import RunConfig, brief
from ..errors import NormlabError
from ..loggers import Loggers
from .control import RunBusy

PREVIOUS = "checkpoint.prev.pt"


def config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(map(str, set(old) | set(new)))
    return [f"{k if k.isidentifier() else brief(k)}: {brief(old.get(k))} -> {brief(new.get(k))}"
            for k in keys if old.get(k) != new.get(k)][:10]


def position(state: dict | None) -> tuple[int, int]:
    """(epochs finished, steps into the next) of a checkpoint's state; (0, 0) for a new run."""
    return (state["epoch"], state["step"]) if state is not None else (0, 0)


class Member:
    """One run: its config and directory, and what it alone owns during training."""

    def __init__(self, cfg: RunConfig, run_dir: Path, device: torch.device, writer: bool = True):
        self.cfg, self.dir, self.writer = cfg, Path(run_dir), writer
        self.run_id = cfg.run_id()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.order: torch.Tensor | None = None       # this epoch's data order
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, wrong, n
        self.rows: list[dict] = []
        self.probe_rows: list[dict] = []              # probes.py's rows, kept in the checkpoint
        self.resume_state: dict | None = None         # read by open(), applied by the trainer
        self.expected: checkpoint.Expected | None = None  # what its checkpoints must hold (open())
        self.lock: rundir.RunLock | None = None
        self.loggers = Loggers(None)                   # --log: opened by the loop when it trains

    # -- the directory -----------------------------------------------------------------------
    def open(self, force: bool = False, expected: checkpoint.Expected | None = None) -> None:
        """Create or reopen the run directory, holding its lock, and read its checkpoint (if
        any), verified against `expected` before anything is written. Refuses a directory
        holding another config, or files that are not normlab's; --force keeps it aside."""
        self.expected = expected or self.expected
        try:
            rundir.make_dir(self.dir)  # a link in its place is refused: never written through
        except OSError as err:
            raise NormlabError(f"cannot create {self.dir} ({err.strerror}); choose a writable --out") from None
        lock = rundir.RunLock(self.dir)
        if not lock.acquire():
            raise RunBusy(str(self.dir))
        try:
            problem = self.check_directory()
        except BaseException:
            lock.release()
            raise
        if problem is None:
            self.lock = lock
            return
        lock.release()
        if not force:
            raise NormlabError(problem)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        rundir.rename_aside(self.dir, f"{self.dir.name}.old-{stamp}")
        self.open(expected=expected)

    def check_directory(self) -> str | None:
        """Why the directory cannot be resumed as this run (None if it can): another config, or
        files that are not normlab's. We hold the lock."""
        rundir.remove_stale_temps(self.dir)  # left by a killed writer
        fix = "use another --out, or --force to start afresh (the old run is kept aside)"
        try:
            existing = rundir.load_json(self.dir / rundir.CONFIG)
        except FileNotFoundError:
            existing = None
        except rundir.Unreadable as err:
            return f"{rundir.CONFIG} is not normlab's: {err}; {fix}"
        if existing is not None and not isinstance(existing.get("config"), dict):
            return f"{rundir.CONFIG} is not normlab's: {self.dir / rundir.CONFIG} holds no config; {fix}"
        if existing and existing["config"] != self.cfg.to_dict():
            changes = "; ".join(config_diff(existing["config"], self.cfg.to_dict()))
            return f"{self.dir} holds a run with a different config ({changes}); {fix}"
        try:  # read and verify the checkpoint now, before anything is written
            path = self.dir / rundir.CHECKPOINT
            self.resume_state = self.read_checkpoint(path) if os.path.lexists(path) else None
        except NormlabError as err:
            return str(err)
        return None

    def read_checkpoint(self, path: Path) -> dict:
        """A checkpoint of this run, bounded by what the run can write and verified against it
        (any checkpoint read, when the run has no expected structure: the caller verifies)."""
        if self.expected is None:
            return checkpoint.load(path)
        return checkpoint.verify(path, checkpoint.load(path, self.expected.max_bytes()), self.expected,
                                 self.run_id)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def previous_state(self) -> dict | None:
        """The checkpoint that an array kept while it wrote its runs' new ones, if one is left."""
        path = self.dir / PREVIOUS
        try:
            return self.read_checkpoint(path) if os.path.lexists(path) else None
        except NormlabError:
            return None  # not a usable copy: the run resumes from its checkpoint

    def status(self) -> dict | None:
        return rundir.read_status(self.dir / rundir.STATUS)

    def write_status(self, state: str, epoch: int, **extra) -> dict:
        status = {"state": state, "run_id": self.run_id, "epoch": epoch,
                  "epochs": self.cfg.epochs, "summary": rundir.summarize(self.rows, self.cfg.epochs),
                  "updated": datetime.datetime.now().isoformat(timespec="seconds"), **extra}
        if self.writer:
            rundir.write_json(self.dir / rundir.STATUS, status)
        return status

    def write_metrics(self) -> None:
        if self.writer:
            rundir.write_metrics(self.dir / rundir.METRICS, self.rows)
            if self.probe_rows:
                probes.write(self.dir, self.probe_rows)

    # -- the checkpoint ------------------------------------------------------------------------
    def state_dict(self, model: dict, optimizer: dict, epoch: int, step: int, seconds: float,
                   array: list[str]) -> dict:
        return {
            "model": model, "optimizer": optimizer,
            "epoch": epoch, "step": step, "order": self.order,
            "sums": self.sums.cpu(), "epoch_seconds": seconds, "rows": self.rows,
            **({"probes": probes.pack(self.probe_rows)} if self.probe_rows else {}),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(), "numpy_rng": checkpoint.numpy_state(),
            "config": self.cfg.to_dict(), **({"array": array} if len(array) > 1 else {}),
        }

    def restore(self, state: dict) -> None:
        """This run's part of a checkpoint's state (the model and position go to the trainer)."""
        self.order = state["order"]
        self.sums = state["sums"].to(self.sums.device)
        self.rows = state["rows"]
        self.probe_rows = probes.unpack(state.get("probes"))
        self.generator.set_state(state["generator"])


def restore_globals(state: dict) -> None:
    """The process's random number generators as a checkpoint saved them."""
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    checkpoint.set_numpy_state(state["numpy_rng"])


def save_checkpoints(members: list[Member], states: list[dict]) -> None:
    """Write each run's checkpoint; for an array, so that a kill at any moment leaves every
    run's previous checkpoint or every run's new one recoverable (see the module docstring)."""
    if len(members) == 1:
        checkpoint.save(members[0].dir / rundir.CHECKPOINT, states[0])
        return
    for member in members:  # the previous checkpoints stay until every new one is in place
        current, previous = member.dir / rundir.CHECKPOINT, member.dir / PREVIOUS
        if current.exists() and not previous.exists():
            checkpoint.keep_copy(current, previous)
    for member, state in zip(members, states):
        checkpoint.save(member.dir / rundir.CHECKPOINT, state)
    for member in members:
        checkpoint.drop_copy(member.dir / PREVIOUS)


def drop_previous(members: list[Member]) -> None:
    """Forget the previous checkpoints of runs that agree on their position."""
    for member in members:
        if (member.dir / PREVIOUS).exists():
            checkpoint.drop_copy(member.dir / PREVIOUS)


def align(members: list[Member]) -> None:
    """Runs of an array killed while it wrote their checkpoints: those ahead go back to the
    previous checkpoint that the array kept for them, so that every run is at the same step."""
    positions = [position(m.resume_state) for m in members]
    if len(set(positions)) <= 1:
        return
    behind = min(positions)
    for member, where in zip(members, positions):
        if where != behind:
            previous = member.previous_state()
            if previous is not None and position(previous) == behind:
                member.resume_state = previous

