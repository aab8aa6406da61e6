"""What every backend shares: a run to train (RunJob), the interface, and training one run.

A backend trains runs somewhere (this machine, a Ray cluster, a SLURM cluster) and reports
each run as it finishes, as submitit's Executor and concurrent.futures do:

    with backend:
        for run_id, status in backend.train(jobs, display):
            ...

study.py decides which runs to train (skip finished, resume unfinished, wait for runs that
another process holds); a backend only trains what it is given. A status is the run's
status.json dict, or {"state": "failed" | "interrupted" | "busy", ...}: "busy" means another
live process holds the run's lock, and study.py tries it again when that process is done.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..config import RunConfig, RuntimeOptions
from ..errors import NormlabError

PROGRESS_SECONDS = 0.5  # how often a training run reports its step


@dataclass(frozen=True)
class RunJob:
    """One run to train: small and picklable, so that it can travel to another machine."""

    run_id: str
    config: dict          # RunConfig.to_dict()
    run_dir: str
    force: bool = False   # start afresh a directory holding another config (kept aside)


Job = tuple  # tuple[RunJob, ...]: runs trained together as one array (one run: a lone run)


class Backend:
    """Trains jobs (arrays of runs) and reports each run as it finishes. Subclasses: local, ray,
    slurm."""

    name = "?"
    detached = False  # True when the runs were handed over and the caller must not wait
    arrays = True     # whether a job may hold several runs (else every job is one run)

    def open(self, out: Path) -> None:
        """Connect and check everything that can be checked before anything is written."""

    def prepare(self, out: Path) -> None:
        """out exists: check that wherever the runs train can write it."""

    def train(self, jobs: list[Job], display=None) -> Iterator[tuple[str, dict]]:
        """Train these jobs; yield (run id, status) as each run finishes, in finishing order.
        Stops early (checkpointing running runs where it can) once engine.STOP is set."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what open() and train() took."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def train_job(job: Job, opts: RuntimeOptions, report: Callable | None = None) -> dict[str, dict]:
    """Train a job (one run, or an array of runs that differ only in their seeds) where this is
    called; return each run's status by run id. Never raises for the runs' own failures (they
    are their statuses). report(run_id, epoch, step, steps) is called at most every half second
    for each run."""
    from ..train import Interrupted, RunBusy, train_array

    cfgs = [RunConfig.from_dict(run.config) for run in job]
    last = [0.0]

    def on_progress(trainer):
        now = time.monotonic()
        if report is not None and (now - last[0] > PROGRESS_SECONDS or trainer.step == trainer.steps):
            last[0] = now
            for member in trainer.members:
                report(member.run_id, trainer.epoch, trainer.step, trainer.steps)

    def every(status: dict) -> dict[str, dict]:
        return {run.run_id: dict(status) for run in job}

    try:
        results = train_array(cfgs, [run.run_dir for run in job], opts, force=job[0].force,
                              on_progress=on_progress, tolerant=len(job) > 1)
        return {run.run_id: results.get(run.run_id, {"state": "interrupted"}) for run in job}
    except Interrupted:
        return every({"state": "interrupted"})
    except RunBusy:
        return every({"state": "busy"})
    except NormlabError as err:
        return every({"state": "failed", "error": str(err)})
    except Exception as err:  # a crash in one job must not stop the study; it is recorded
        return every({"state": "failed", "error": f"{type(err).__name__}: {err}"})


def options_for_nodes(opts: RuntimeOptions, threads: int, gpus: float) -> RuntimeOptions:
    """This machine's runtime options for runs on other machines: the same speed options, torch
    threads = the CPUs reserved per run, the data directory as an absolute path (other nodes
    have other working directories and environments), CPU where no GPU is reserved."""
    data_dir = opts.data_dir or os.environ.get("NORMLAB_DATA")
    return dataclasses.replace(opts, threads=opts.threads or threads, progress=False,
                               device=opts.device if gpus else "cpu",
                               data_dir=str(Path(data_dir).absolute()) if data_dir else None)


def positive(value: float | None, flag: str, whole: bool = False) -> None:
    """Refuse a resource count that is not positive (or not whole where it must be)."""
    if value is None:
        return
    if not value > 0:
        raise NormlabError(f"{flag} must be positive, got {value:g}; leave it out to use the default")
    if whole and value != int(value):
        raise NormlabError(f"{flag} must be a whole number here, got {value:g}")
