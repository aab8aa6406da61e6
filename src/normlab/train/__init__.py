"""Training: one loop over an array of runs (a lone run is an array of one).

    loop.py         the loop: build, step, epochs, divergence, resume positions
    evaluation.py   each run's loss and error on a split, PreciseBN, an epoch's rows, the probes
    directories.py  the runs' directories: config.json, statuses, checkpoints written and restored
    state.py        each run's own state: lock, data order, checkpoint, status; array alignment
    array.py        R runs of one shape fused into one grouped network, and split back
    build.py        device, each run's initial model, the optimizer
    ranks.py        torchrun: each rank's part of a step, collectives, synchronised BN
    control.py      the stop flag and the exceptions a stopped or busy run raises
    fast.py         CUDA graphs and torch.compile for the whole step (--fast-path)
    memory.py       the out-of-GPU-memory probe before anything is written

`train(cfg, run_dir)` trains (or resumes, or skips if finished) one run; `train_array(cfgs,
run_dirs)` trains runs that differ only in their seeds as one array.
"""
from __future__ import annotations

from pathlib import Path

from .. import rundir
from ..config import RunConfig, RuntimeOptions
from ..errors import NormlabError
from . import ranks
from .array import auto_array_size, fusable
from .build import resolve_device
from .control import EXIT_INTERRUPTED, STOP, Interrupted, RunBusy
from .loop import Trainer


def start(group: ranks.Single, cfgs: list[RunConfig], run_dirs: list, opts: RuntimeOptions,
          force: bool, tolerant: bool = False) -> Trainer:
    """The trainer built on every rank and its run directories opened (and locked) by rank 0;
    any rank's error is every rank's error. Use it as a context manager (it holds the locks)."""
    from ..data import SOURCES, find_folder

    if group is ranks.SINGLE:
        trainer = Trainer(cfgs, run_dirs, opts)
        trainer.open(force=force, tolerant=tolerant)
        return trainer
    with group.agreed():
        if group.writer and cfgs[0].data in SOURCES:  # one download, not one per rank
            find_folder(SOURCES[cfgs[0].data], opts.data_dir, download=True)
    with group.agreed():
        trainer = Trainer(cfgs, run_dirs, opts, group)
    group.check_same({"run": cfgs[0].run_id(), "training images": len(trainer.data.train),
                      "test images": len(trainer.data.test)})
    with group.agreed():
        if group.writer:
            try:
                trainer.open(force=force)
            except RunBusy as err:
                raise NormlabError(f"{err} is being trained by another process; wait for it or use "
                                   f"another --out") from None
    group.attach(trainer)
    return trainer


def train_array(cfgs: list[RunConfig], run_dirs: list, opts: RuntimeOptions | None = None, *,
                force: bool = False, on_progress=None, on_epoch=None, tolerant: bool = False) -> dict[str, dict]:
    """Train (or resume, or skip if finished) the runs `cfgs`, which differ only in their seeds,
    as one array in `run_dirs`; return each run's status by run id. tolerant: a run that another
    process holds ("busy") or whose directory is refused ("failed") is left out, not an error."""
    for run_dir in run_dirs:  # the directory the caller named: no link is followed below it
        rundir.confine(Path(run_dir).parent)
    with start(ranks.SINGLE, cfgs, [Path(d) for d in run_dirs], opts or RuntimeOptions(), force,
               tolerant) as trainer:
        return trainer.run(on_progress, on_epoch)


def train(cfg: RunConfig, run_dir: str | Path, opts: RuntimeOptions | None = None, *,
          force: bool = False, on_progress=None, on_epoch=None) -> dict:
    """Train (or resume, or skip if finished) the run `cfg` in `run_dir`; return its status."""
    return train_array([cfg], [run_dir], opts, force=force, on_progress=on_progress,
                       on_epoch=on_epoch)[cfg.normalized().run_id()]


__all__ = ["EXIT_INTERRUPTED", "STOP", "Interrupted", "RunBusy", "Trainer", "auto_array_size", "fusable", "resolve_device",
           "start", "train", "train_array"]
