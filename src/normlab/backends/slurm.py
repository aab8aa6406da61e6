"""A SLURM cluster: the study's jobs go out as one job array, through submitit.

Each array task trains one job (a run, or an array of runs fused into one model: runs that
differ only in their seeds) into the results directory, which every node must share.
On SLURM's warning signal (USR2, sent before a time limit or, where the cluster is set up for
it, a preemption) submitit calls TrainRun.checkpoint(): the runs checkpoint at their next step
and the task is requeued, to resume there. With --no-wait this process returns once the
array is queued; each run's task id is kept in OUT/.slurm/jobs.json, so that a later
`normlab reproduce` waits for the runs still queued instead of submitting them again (and
`normlab report` reads whatever has finished). This process follows the tasks with squeue
and the run directories: the cluster needs no accounting database (sacct).

submitit hands each task its work as a pickle in OUT/.slurm, which the node unpickles, and
would hand back its result the same way. So OUT/.slurm is private (mode 0700, this user's, no
link; one that others could write is refused), and no pickle is ever read here: each task
writes its outcome as JSON (OUT/.slurm/outcomes/TASK.json), checked before it is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .. import rundir
from ..config import RuntimeOptions
from ..errors import NormlabError
from .base import Backend, Job, options_for_nodes, positive, train_job

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # the extra is missing: SlurmBackend() says how to install it
    submitit, Checkpointable = None, object

INSTALL = "--backend slurm needs submitit, an extra of normlab: pip install 'normlab[slurm]'"
COMMANDS = ("sbatch", "squeue", "sinfo", "scontrol", "srun")
MAX_TIMEOUTS = 20        # requeues after hitting --time (preemptions do not count)
SIGNAL_SECONDS = 90      # the warning comes this long before the time limit
POLL_SECONDS = 3         # how often squeue and the run directories are read
BUSY_SECONDS = 10        # a task whose run another process trains checks back this often
RESULT_GRACE = 15        # seconds a shared filesystem may lag behind a task that ended
DEFAULT_MINUTES = 24 * 60
TASK_ID = re.compile(r"\d{1,12}_\d{1,9}")  # an array task as sbatch and squeue name it
STATES = ("done", "diverged", "failed", "interrupted", "busy")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}


class TrainRun(Checkpointable):
    """One array task: train one job (a run or an array of runs), then write each run's outcome
    (OUT/.slurm/outcomes/TASK.json). Training runs in a thread so that the main thread is free
    for SLURM's signal, whose handler (submitit's) calls checkpoint() and then requeues."""

    def __init__(self, outcomes: str):
        self.outcomes = outcomes

    def __call__(self, job: Job, opts: RuntimeOptions) -> dict:
        from ..train import STOP

        STOP.clear()
        rundir.confine(Path(self.outcomes).parent.parent)  # OUT: nothing below it is followed
        self.results: dict = {}
        self.thread = threading.Thread(target=self._train, args=(job, opts), daemon=True)
        self.thread.start()
        while self.thread.is_alive():
            self.thread.join(0.5)
        task = submitit.JobEnvironment().job_id
        rundir.write_json(Path(self.outcomes) / f"{task}.json", {"results": self.results})
        return {rid: r.get("state") for rid, r in self.results.items()}

    def _train(self, job: Job, opts: RuntimeOptions) -> None:
        from ..train import STOP

        results = train_job(job, opts)
        while any(r.get("state") == "busy" for r in results.values()) and not STOP.wait(BUSY_SECONDS):
            results = train_job(job, opts)  # the locks may be free now: resume, or skip what is finished
        self.results.update(results)

    def checkpoint(self, job: Job, opts: RuntimeOptions) -> "DelayedSubmission":
        """Called on the warning signal: checkpoint at the next step, then resume from there."""
        from ..train import STOP

        STOP.set()
        if getattr(self, "thread", None) is not None:
            self.thread.join()
        return DelayedSubmission(TrainRun(self.outcomes), job, opts)


def minutes(text: str) -> int | None:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in whole minutes, rounded up;
    None for infinite."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ValueError(text)
    days, a, b, c = (int(v) if v else 0 for v in match.groups())
    if match.group(1) or match.group(4):  # D-HH[:MM[:SS]] or HH:MM:SS
        hours, mins, secs = a, b, c
    else:                                 # MM or MM:SS
        hours, mins, secs = 0, a, b
    return math.ceil((((days * 24 + hours) * 60 + mins) * 60 + secs) / 60)


def _gpus(gres: str) -> int:
    """GPUs in a node's generic resources, e.g. 'gpu:a100:4(S:0-1),shard:8' -> 4."""
    count = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.strip().split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            count += int(fields[-1])
    return count


def _command(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def partitions() -> tuple[dict[str, list[tuple[int, int | None, int]]], str | None]:
    """Partition -> [(GPUs, time limit in minutes, CPUs) per node group], and the default."""
    done = _command(["sinfo", "-h", "-o", "%P|%G|%l|%c"])
    if done.returncode:
        first = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        raise NormlabError(f"sinfo cannot reach the SLURM controller ({first}); check the cluster "
                           f"with `sinfo`, or use --backend local")
    found, default = {}, None
    for line in done.stdout.splitlines():
        name, gres, limit, cpus = line.split("|")
        if name.endswith("*"):
            name = default = name[:-1]
        found.setdefault(name, []).append((_gpus(gres), minutes(limit) if limit else None,
                                           int(re.sub(r"\D.*", "", cpus) or 0)))
    return found, default


def queue_states(array_ids: set[str]) -> dict[str, str] | None:
    """Task id ('123_4') -> state for the arrays' tasks that SLURM still knows; None when
    squeue cannot answer now (try again later). A task missing from the answer has ended
    long enough ago for SLURM to forget it."""
    if not array_ids:
        return {}
    done = _command(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(sorted(array_ids))])
    if done.returncode:
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        states[task] = state.split()[0] if state else "UNKNOWN"
    return states


@dataclasses.dataclass
class Task:
    runs: dict[str, Path]           # run id -> run directory: the runs of this call it trains
    job: "submitit.SlurmJob"
    ended_at: float | None = None   # when squeue first showed it ended without a result
    epochs: dict = dataclasses.field(default_factory=dict)  # run id -> last epoch shown


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, opts: RuntimeOptions, partition: str | None = None, cpus_per_run: float | None = None,
                 gpus_per_run: float | None = None, time_limit: str | None = None,
                 sbatch: dict | None = None, workers: int | None = None, wait: bool = True):
        if submitit is None:
            raise NormlabError(INSTALL)
        positive(cpus_per_run, "--cpus-per-run", whole=True)
        positive(gpus_per_run, "--gpus-per-run", whole=True)
        if opts.device.startswith("cuda:"):
            raise NormlabError(f"--device {opts.device} names a GPU of this machine; on SLURM each run "
                               f"gets its own GPUs: use --device cuda (or auto)")
        if opts.device == "cpu" and gpus_per_run:
            raise NormlabError("--gpus-per-run with --device cpu: leave one of them out")
        self.minutes = None
        if time_limit is not None:
            try:
                self.minutes = minutes(time_limit)
            except ValueError:
                self.minutes = 0
            if not self.minutes:
                raise NormlabError(f"--time must be a time limit per run such as 04:00:00 (HH:MM:SS), "
                                   f"1-00:00:00 or 90 (minutes), got '{time_limit}'")
        self.opts, self.partition, self.sbatch, self.workers, self.wait = (
            opts, partition, dict(sbatch or {}), workers, wait)
        self.cpus = int(cpus_per_run or 1)
        self.gpus = None if gpus_per_run is None else int(gpus_per_run)

    # -- checks before anything is written ------------------------------------------------
    def open(self, out: Path) -> None:
        missing = next((c for c in COMMANDS if shutil.which(c) is None), None)
        if missing:
            raise NormlabError(f"'{missing}' is not on the PATH: run normlab on a login node of the "
                               f"SLURM cluster, or use --backend local or ray")
        found, default = partitions()
        self.partition = self.partition or default
        if not self.partition or self.partition not in found:
            given = f"no partition '{self.partition}'" if self.partition else "no default partition"
            raise NormlabError(f"{given} on this SLURM cluster; choose one with --partition: "
                               f"{', '.join(found) or 'none found'}")
        nodes = found[self.partition]
        most_gpus = max(g for g, _, _ in nodes)
        most_cpus = max(c for _, _, c in nodes)
        limits = [t for _, t, _ in nodes if t is not None]
        limit = max(limits) if len(limits) == len(nodes) else None
        if self.gpus is None:
            self.gpus = 1 if most_gpus and self.opts.device != "cpu" else 0
        if self.gpus > most_gpus:
            raise NormlabError(f"--gpus-per-run {self.gpus} is more than a node of partition "
                               f"'{self.partition}' has ({most_gpus} GPUs); lower it"
                               + ("" if most_gpus else ", or leave it out to train on CPUs"))
        if self.cpus > most_cpus:
            raise NormlabError(f"--cpus-per-run {self.cpus} is more than a node of partition "
                               f"'{self.partition}' has ({most_cpus} CPUs); lower it")
        if self.opts.device == "cuda" and not self.gpus:
            raise NormlabError(f"--device cuda, but partition '{self.partition}' has no GPUs; "
                               f"use --device auto or cpu, or another --partition")
        if self.minutes is None:
            self.minutes = min(limit, DEFAULT_MINUTES) if limit else DEFAULT_MINUTES
        elif limit is not None and self.minutes > limit:
            raise NormlabError(f"--time is more than partition '{self.partition}' allows ({limit} "
                               f"minutes); lower it (a run that needs longer is checkpointed and requeued)")
        self.run_opts = options_for_nodes(self.opts, self.cpus, self.gpus)
        self.folder = Path(out).absolute() / ".slurm"

    # -- submitting and following --------------------------------------------------------
    def _record(self) -> dict[str, str]:
        """Run id -> task id of the runs this results directory has submitted (the runs of an
        array share their task)."""
        runs = (rundir.read_json(self.folder / "jobs.json") or {}).get("runs")
        if not isinstance(runs, dict):
            return {}
        return {rid: tid for rid, tid in runs.items() if isinstance(tid, str) and TASK_ID.fullmatch(tid)}

    def _job(self, task_id: str):
        return submitit.SlurmJob(folder=self.folder / "%j", job_id=task_id)

    def _submit(self, jobs: list[Job]) -> dict[str, str]:
        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=MAX_TIMEOUTS)
        outcomes = str(rundir.make_dir(self.folder / "outcomes"))
        executor.update_parameters(
            job_name="normlab", partition=self.partition, time=self.minutes, nodes=1, ntasks_per_node=1,
            cpus_per_task=self.cpus, gpus_per_node=self.gpus or None, signal_delay_s=SIGNAL_SECONDS,
            array_parallelism=self.workers or 256, additional_parameters=self.sbatch or None)
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stderr(quiet):  # submitit prints sbatch's errors, several lines
                submitted = executor.map_array(TrainRun(outcomes), jobs, [self.run_opts] * len(jobs))
        except (submitit.core.utils.FailedJobError, OSError) as err:
            lines = [l for l in str(err).splitlines() if l.strip()]
            raise NormlabError(f"sbatch refused the job array ({lines[-1] if lines else err}); check "
                               f"--partition, --time, --cpus-per-run, --gpus-per-run and --sbatch") from None
        ids = {run.run_id: task.job_id for job, task in zip(jobs, submitted) for run in job}
        record = {**self._record(), **ids}
        rundir.write_json(self.folder / "jobs.json", {"runs": record})
        return ids

    def train(self, jobs: list[Job], display=None) -> Iterator[tuple[str, dict]]:
        from ..train import STOP

        private_folder(self.folder)
        record = self._record()
        runs = [run for job in jobs for run in job]
        states = queue_states({record[r.run_id].split("_")[0] for r in runs if r.run_id in record})
        if states is None:  # never submit twice what may still be queued
            raise NormlabError("squeue cannot reach the SLURM controller; check the cluster with "
                               "`squeue`, then run the same command again")
        live = {r.run_id: record[r.run_id] for r in runs
                if r.run_id in record and states.get(record[r.run_id], "ENDED") not in ENDED}
        # a run still queued is followed in its task; the others of its job go out again together
        new = [rest for rest in (tuple(r for r in job if r.run_id not in live) for job in jobs) if rest]
        ids = self._submit(new) if new else {}
        arrays = sorted({t.split("_")[0] for t in [*live.values(), *ids.values()]})
        fused = sum(len(job) for job in new if len(job) > 1)
        tqdm.write(f"SLURM job array{'s' if len(arrays) > 1 else ''} {', '.join(arrays)} on partition "
                   f"'{self.partition}': {sum(map(len, new))} runs submitted in {len(new)} task{'s' if len(new) != 1 else ''}"
                   f"{f' ({fused} of them fused into run arrays)' if fused else ''}, {len(live)} already "
                   f"queued (follow them with: squeue -j {','.join(arrays)})")
        if not self.wait:
            self.detached = True
            return
        tasks: dict[str, Task] = {}
        for run in runs:
            tid = live.get(run.run_id) or ids[run.run_id]
            tasks.setdefault(tid, Task({}, self._job(tid))).runs[run.run_id] = Path(run.run_dir)
        yield from self._follow(tasks, display, STOP)

    def _follow(self, tasks: dict[str, Task], display, stop) -> Iterator[tuple[str, dict]]:
        self.following = set(tasks)
        while tasks:
            if stop.is_set():
                tqdm.write("normlab: stopped waiting; the SLURM jobs keep running: run the same command "
                           "again to wait for them, or scancel them")
                return
            states = queue_states({tid.split("_")[0] for tid in tasks})
            for tid, task in list(tasks.items()):
                results = self._outcome(tid, task, states)
                if results is not None:
                    del tasks[tid]
                    yield from results.items()
                elif display and states and states.get(tid) == "RUNNING":
                    self._show_progress(task, display)
            if tasks:
                stop.wait(POLL_SECONDS)

    def _outcome(self, tid: str, task: Task, states: dict | None) -> dict[str, dict] | None:
        """Each of the task's runs' result once it has ended; None while it is queued or running."""
        written = read_outcome(self.folder / "outcomes" / f"{tid}.json", list(task.runs))
        if written is not None:
            return written
        if states is None or states.get(tid, "ENDED") not in ENDED:
            task.ended_at = None
            return None
        task.ended_at = task.ended_at or time.monotonic()
        if time.monotonic() - task.ended_at < RESULT_GRACE:
            return None  # a shared filesystem may show the result a little later
        state = states.get(tid, "ENDED")
        if not task.job.paths.stdout.exists():
            _command(["scancel", *sorted({t.split("_")[0] for t in self.following})])
            raise NormlabError(f"SLURM task {tid} ended ({state}) without writing its log to "
                               f"{task.job.paths.stdout.parent}; --out must be a directory that every "
                               f"node shares and can write (the study's jobs were cancelled)")
        results = {}
        for run_id, run_dir in task.runs.items():
            status = rundir.read_status(run_dir / rundir.STATUS) or {}
            results[run_id] = status if status.get("state") in rundir.FINISHED else {
                "state": "failed", "error": f"SLURM task {tid} ended ({state}) without a result; "
                                            f"see {task.job.paths.stderr}"}
        return results

    def _show_progress(self, task: Task, display) -> None:
        """Running tasks' progress, from their run directories (one step per epoch)."""
        for run_id, run_dir in task.runs.items():
            status = rundir.read_status(run_dir / rundir.STATUS) or {}
            info = rundir.read_json(run_dir / rundir.CONFIG) or {}
            epoch, steps = status.get("epoch"), info.get("steps_per_epoch")
            if type(epoch) is int and type(steps) is int and steps > 0 and epoch != task.epochs.get(run_id):
                task.epochs[run_id] = epoch
                display.progress(run_id, epoch, 0, steps)


def private_folder(folder: Path) -> None:
    """OUT/.slurm, where submitit keeps the pickles that the nodes unpickle: a directory of this
    user's that nobody else can write (created 0700; an existing one that others could write
    may hold planted files, so it is refused)."""
    rundir.make_dir(folder.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise NormlabError(f"{folder} is not a directory (a link or a file); move it away, then run the "
                           f"same command again")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise NormlabError(f"{folder} {'belongs to another user' if info.st_uid != os.getuid() else 'can be written by other users'}, "
                           f"and SLURM's tasks unpickle what is in it: move it away (mv {folder} "
                           f"{folder}.old) and run the same command again")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o700)  # nor read by others: the pickles hold this machine's options
    finally:
        os.close(fd)


def read_outcome(path: Path, run_ids: list[str]) -> dict[str, dict] | None:
    """The outcome a task wrote (JSON, checked): a result for each of `run_ids`, or None when
    there is none (yet) or it does not hold them all."""
    try:
        written = rundir.load_json(path)
    except (FileNotFoundError, NormlabError):
        return None
    results = written.get("results")
    if not isinstance(results, dict):
        return None
    out = {rid: results.get(rid) for rid in run_ids}
    for result in out.values():
        if not isinstance(result, dict) or result.get("state") not in STATES:
            return None
        if not all(isinstance(v, (str, int, float, bool, type(None), dict)) for v in result.values()):
            return None
    return out
