"""The search's trials, scheduled by Optuna, whose journal file in the search directory is the
shared state: a killed search resumes from it and several processes share it.

A trial is one run (a candidate and a seed) trained by engine.train in an ordinary run directory
(OUT/runs/<run-id>/), reporting its validation error after every epoch; Optuna's
SuccessiveHalvingPruner (pruner.py: made safe to ask twice) decides at each rung whether it goes
on. A pruned run stops after that epoch with its checkpoint, resumable like any other. Seed 0
meets the pruner and selects; the finalists' and baselines' other seeds (1..S) are trained to the
end for the final ranking, which they alone decide (results.py).

Who trains what: a trial belongs to the process holding OUT/locks/trial-N.lock (an flock, dropped
by the kernel when the process dies). Optuna leaves the trial of a killed process RUNNING; the next
process finds its lock free and adopts it in place: same trial number, the run resumes from its
checkpoint, epochs already reported are not reported again. So a search killed at any moment goes
on exactly where it stopped, at once. (Optuna's own remedy, heartbeats with
RetryFailedTrialCallback, fails the trial after a grace period and queues a copy at the end of the
queue, which changes the order in which trials meet the pruner, and so the outcome.) Queue
changes (enqueue, take, adopt) happen under OUT/locks/queue.lock, so no trial is queued or taken
twice, and the run directory's own lock keeps any run from being trained twice at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from .. import rundir
from ..config import RuntimeOptions
from ..train import STOP, Interrupted, RunBusy, train
from ..errors import NormlabError
from .locks import FileLock
from .plan import SearchSpec
from .pruner import ResumableHalvingPruner

STUDY_NAME = "search-groups"
JOURNAL, LOG, RUNS = "optuna.journal", "trials.log", "runs"


class Pruned(Interrupted):
    """Stopped at a rung. An Interrupted, so that the engine leaves the run resumable (any other
    exception from a callback would mark the run failed)."""


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise NormlabError("search-groups needs Optuna: pip install 'normlab[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class Search:
    """One process's handle on the search in `out`; creates it on first use."""

    def __init__(self, out: Path, spec: SearchSpec):
        optuna = import_optuna()
        from .journal import CheckedJournal, CheckedStorage

        self.out, self.spec, self.optuna = rundir.confine(out), spec, optuna  # no links below OUT
        self.states = optuna.trial.TrialState
        try:
            rundir.make_dir(self.out / "locks")
        except OSError as err:
            raise NormlabError(f"cannot create {self.out} ({err.strerror}); choose a writable --out") from None
        self.storage = CheckedStorage(CheckedJournal(
            self.out / JOURNAL, lock_obj=FileLock(self.out / "locks" / "journal.lock")))
        self.queue_lock = FileLock(self.out / "locks" / "queue.lock")
        pruner = ResumableHalvingPruner(spec.min_epochs, spec.reduction_factor)
        with self.queue_lock:
            # load when it exists (create_study(load_if_exists=True) would append to the journal)
            exists = STUDY_NAME in {s.study_name for s in self.storage.get_all_studies()}
            make = optuna.load_study if exists else optuna.create_study
            self.study = make(storage=self.storage, study_name=STUDY_NAME, pruner=pruner,
                              sampler=optuna.samplers.RandomSampler(seed=0),
                              **({} if exists else {"direction": "minimize"}))
            stored = self.study.user_attrs.get("spec")
            if stored is None:
                self.study.set_user_attr("spec", spec.to_dict())
            elif stored != spec.to_dict():
                raise NormlabError(f"{self.out} holds a search with other settings "
                                   f"({'; '.join(differences(stored, spec.to_dict()))}); use another "
                                   f"--out, or the same settings to resume that search")
            self._queue()
        self.study_id = self.storage.get_study_id_from_name(STUDY_NAME)
        self.baselines = {c.spec for c in spec.baselines()}

    # -- the queue ------------------------------------------------------------------------------
    def trials(self, *states):
        found = self.study.get_trials(deepcopy=False, states=states or None)
        for t in found:  # the journal is data from a shared directory: only trials we queue
            if not self._queued(t):
                raise NormlabError(f"{self.out / JOURNAL} holds trial {t.number}, which this search never "
                                   f"queued; move the journal away to start the search afresh")
        return found

    def _queued(self, trial) -> bool:
        """Could this search have made the trial (a candidate, a seed, one float value)?"""
        norms = {c.spec for c in self.spec.candidates}
        if not isinstance(trial.system_attrs, dict) or not isinstance(trial.params, dict):
            return False
        values = trial.values
        if values is not None and (not isinstance(values, list) or len(values) != 1 or type(values[0]) is not float):
            return False
        fixed = params(trial)
        if not (isinstance(fixed, dict) and isinstance(fixed.get("norm"), str) and fixed["norm"] in norms
                and type(fixed.get("seed")) is int and 0 <= fixed["seed"] <= self.spec.seeds):  # 0, then 1..S
            return False
        # another command may be suggesting its parameters right now: norm first, then seed
        return all(key in ("norm", "seed") and value == fixed[key] for key, value in trial.params.items())

    def _queue(self) -> None:
        """Queue every trial known so far that is not queued yet (call under the queue lock):
        the initial ones, then the final seeds of the finalists once they are known."""
        planned = self.spec.queue()
        planned += [(norm, s) for norm in self.finalists() or [] for s in self.spec.final_seeds()]
        for norm, seed in planned:
            self.study.enqueue_trial({"norm": norm, "seed": seed}, skip_if_exists=True)

    def finalists(self) -> list[str] | None:
        """Once every seed-0 trial is finished or pruned: the best k = max(1, N / η^rungs) of
        those that reached the last epoch (as many as synchronous halving would keep; the
        asynchronous pruner lets more through), by their final validation error. The
        baselines are finalists anyway."""
        seed0 = [t for t in self.trials() if params(t)["seed"] == 0]
        if len(seed0) < len(self.spec.candidates) or \
                any(t.state in (self.states.WAITING, self.states.RUNNING) for t in seed0):
            return None
        survivors = sorted((t for t in seed0 if t.state == self.states.COMPLETE),
                           key=lambda t: (t.value, t.number))
        return [params(t)["norm"] for t in survivors[:self.spec.finalist_count()]]

    def claim(self):
        """(trial, its lock) to work on, 'wait' while other processes hold the last ones, or
        'done'. Adopts trials left RUNNING by a dead process first."""
        with self.queue_lock:
            self._queue()
            for t in self.trials(self.states.RUNNING):
                lock = FileLock(self.out / "locks" / f"trial-{t.number}.lock")
                if lock.acquire(blocking=False):
                    return self.optuna.trial.Trial(self.study, self.trial_id(t.number)), lock
            if self.trials(self.states.WAITING):
                trial = self.study.ask()
                lock = FileLock(self.out / "locks" / f"trial-{trial.number}.lock")
                lock.acquire(blocking=False)  # a new number: nobody else can hold it
                return trial, lock
            return "wait" if self.trials(self.states.RUNNING) else "done"

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    # -- one trial ------------------------------------------------------------------------------
    def run_trial(self, trial, opts: RuntimeOptions, force: bool, say) -> str:
        """Train the trial's run as far as the pruner lets it; tell Optuna the outcome."""
        spec = self.spec
        norm = trial.suggest_categorical("norm", [c.spec for c in spec.candidates])
        seed = trial.suggest_int("seed", 0, spec.seeds)
        cfg = spec.config(norm, seed)
        run_dir = self.out / RUNS / cfg.run_id()
        reported = set(self.storage.get_trial(self.trial_id(trial.number)).intermediate_values)
        competes = seed == 0          # seed 0 meets the pruner and selects; other seeds rank the finalists
        prunable = competes and norm not in self.baselines
        name = f"trial {trial.number} {norm} seed {seed}"
        trained: list[int] = []

        def decide() -> bool:
            """Report to the pruner (baselines too: they are competitors); True = stop here."""
            return trial.should_prune() and prunable

        def observe(rows) -> bool:
            for row in rows:
                epoch = row["epoch"]
                if epoch in reported:
                    continue
                trial.report(row["val_error"], epoch)
                reported.add(epoch)
                say(f"{name}: epoch {epoch}/{spec.epochs}, validation error {row['val_error']:.2f}%")
                if competes and epoch < spec.epochs and decide():
                    return True
            return False

        def on_epoch(trainer, member, row) -> None:
            trained.append(row["epoch"])
            if observe(member.rows):
                raise Pruned(str(run_dir))

        say(f"{name}: {'resuming' if (run_dir / rundir.CHECKPOINT).exists() else 'starting'} ({run_dir.name})")
        # A process killed after a report left the pruner's decision unmade, or made but not
        # recorded: ask again (the pruner answers a repeated question as the first time).
        pruned = bool(competes and reported and max(reported) < spec.epochs and decide())
        pruned = pruned or observe(rundir.read_metrics(run_dir / rundir.METRICS))
        status = {}
        opts = dataclasses.replace(opts, test_set=False)  # read once, for the winner (results.py)
        while not pruned:
            try:
                status = train(cfg, run_dir, opts, force=force, on_epoch=on_epoch)
                break
            except Pruned:
                pruned = True
            except RunBusy:  # trained by another command (normlab train?): wait for it
                if STOP.is_set():
                    raise Interrupted(str(run_dir)) from None
                time.sleep(2)
        if not pruned:  # a run finished elsewhere: its last epochs are not reported yet
            pruned = observe(rundir.read_metrics(run_dir / rundir.METRICS))
        if pruned:
            mark_pruned(run_dir, max(reported))
            self.study.tell(trial, state=self.states.PRUNED)
            outcome = f"pruned after epoch {max(reported)}"
        elif status.get("state") == "done":
            self.study.tell(trial, rundir.read_metrics(run_dir / rundir.METRICS)[-1]["val_error"])
            outcome = "finished"
        else:
            trial.set_user_attr("diverged_in_epoch", status.get("diverged_in_epoch"))
            self.study.tell(trial, state=self.states.FAIL)
            outcome = f"diverged in epoch {status.get('diverged_in_epoch')}"
        self.log({"trial": trial.number, "norm": norm, "seed": seed, "run": run_dir.name,
                  "epochs_trained": trained, "outcome": outcome})
        say(f"{name}: {outcome}")
        return outcome

    def log(self, record: dict) -> None:
        """One line per trial handled: who trained which epochs of which run (appends of one
        short line are atomic, so several processes can share the file)."""
        rundir.append_line(self.out / LOG, json.dumps({"pid": os.getpid(), **record}) + "\n")

    def work(self, opts: RuntimeOptions, force: bool, say) -> str:
        """Take trials until none is left ('done') or a signal stops this process."""
        while not STOP.is_set():
            claimed = self.claim()
            if claimed == "done":
                return "done"
            if claimed == "wait":
                time.sleep(2)
                continue
            trial, lock = claimed
            try:
                self.run_trial(trial, opts, force, say)
            finally:
                lock.release()
        return "interrupted"


def params(trial) -> dict:
    """A trial's norm and seed (queued trials hold them before they are suggested)."""
    return trial.system_attrs.get("fixed_params") or trial.params


def mark_pruned(run_dir: Path, epoch: int) -> None:
    """The run stopped on purpose: say so in its status (the engine left it 'running')."""
    status = rundir.read_json(run_dir / rundir.STATUS)
    if status and status.get("state") == "running":
        status.update(state="interrupted", stopped_by=f"search-groups: pruned after epoch {epoch}")
        rundir.write_json(run_dir / rundir.STATUS, status)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
