"""A Ray cluster: every run is a Ray task with its own CPUs and GPUs (fractions pack runs on a GPU).

The results directory must be one that every node shares (NFS, Lustre...) and can write:
checked before anything trains. A task whose worker or node dies is retried by Ray
(MAX_RETRIES) and resumes from the run's last checkpoint; the run directory's lock keeps a
retried task from training a run that a stale worker still holds. Running tasks report
their progress to a small actor that this process reads for the live display; the same
actor carries a stop (Ctrl-C) to them, and their runs checkpoint and stop.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

from .. import rundir
from ..config import RuntimeOptions
from ..errors import NormlabError
from .base import Backend, Job, options_for_nodes, positive, train_job

MAX_RETRIES = 3          # a task whose worker or node died is started again (Ray's default)
PROBE_SECONDS = 60       # how long every node has to answer the check of the results directory
INSTALL = "--backend ray needs Ray, an extra of normlab: pip install 'normlab[ray]'"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise NormlabError(INSTALL) from None
    return ray


class Channel:
    """An actor between the tasks and this process: progress one way, a stop the other."""

    def __init__(self):
        self.items, self.stopping = [], False

    def put(self, item) -> bool:
        self.items.append(item)
        return self.stopping

    def take(self) -> list:
        items, self.items = self.items, []
        return items

    def stop(self) -> None:
        self.stopping = True

    def is_stopping(self) -> bool:
        return self.stopping


def _train_on_worker(job: Job, opts: RuntimeOptions, channel) -> dict[str, dict]:
    """A Ray task: train one job (a run, or an array of runs) on whichever worker Ray chose."""
    import ray

    from ..train import STOP

    STOP.clear()  # Ray reuses worker processes
    if ray.get(channel.is_stopping.remote()):
        return {run.run_id: {"state": "interrupted"} for run in job}

    def report(*item):
        try:
            if ray.get(channel.put.remote(item)):
                STOP.set()  # checkpoint at the next step, then stop
        except Exception:
            pass  # progress is a nicety: never let it stop a run
    return train_job(job, opts, report)


def _probe(out: str, token: str) -> str | None:
    """On one node: is `out` the shared directory, and can this node write it?"""
    where = socket.gethostname()
    if not (Path(out) / f".normlab-probe-{token}").exists():
        return f"{where} does not see {out} (not a shared directory)"
    mine = Path(out) / f".normlab-probe-{token}-{where}-{os.getpid()}"
    try:
        rundir.atomic_write(mine, b"ok")  # as the runs will write: atomically, never through a link
        mine.unlink()
    except (OSError, NormlabError) as err:
        return f"{where} cannot write {out} ({getattr(err, 'strerror', None) or err})"
    return None


def resolve_address(address: str) -> str:
    """HOST:PORT of a Ray cluster that answers, from --address (auto: RAY_ADDRESS, or the
    cluster started on this machine by `ray start`). One line and exit 2 otherwise."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or ""
        if not address:
            try:
                from ray._private.services import canonicalize_bootstrap_address_or_die
                address = canonicalize_bootstrap_address_or_die("auto")
            except ConnectionError as err:
                found = "several Ray clusters run" if "multiple" in str(err) else "no Ray cluster runs"
                raise NormlabError(f"{found} on this machine; give the head node's address with --address "
                                   f"HOST:PORT, or start a cluster with `ray start --head`") from None
            except Exception:  # Ray's private helper moved: let ray.init find the cluster
                return "auto"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise NormlabError(f"--address must be auto or HOST:PORT (the head node's GCS port, 6379 by "
                           f"default), got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise NormlabError(f"no Ray cluster answers at {address} ({err.strerror or err}); start one "
                           f"with `ray start --head --port {port}` or give the right --address") from None
    return address


class RayBackend(Backend):
    name = "ray"

    def __init__(self, opts: RuntimeOptions, address: str = "auto", cpus_per_run: float | None = None,
                 gpus_per_run: float | None = None, workers: int | None = None):
        self.ray = _import_ray()
        positive(cpus_per_run, "--cpus-per-run")
        positive(gpus_per_run, "--gpus-per-run")
        if gpus_per_run and gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
            raise NormlabError(f"--gpus-per-run {gpus_per_run:g}: Ray packs runs on a GPU with fractions "
                               f"below 1 (0.5, 0.25...); above 1 it takes whole GPUs")
        if opts.device.startswith("cuda:"):
            raise NormlabError(f"--device {opts.device} names a GPU of this machine; on Ray each run "
                               f"gets its own GPUs: use --device cuda (or auto)")
        if opts.device == "cpu" and gpus_per_run:
            raise NormlabError("--gpus-per-run with --device cpu: leave one of them out")
        self.opts, self.address, self.workers = opts, address, workers
        self.cpus, self.gpus = cpus_per_run or 1, gpus_per_run
        self.connected, self.channel, self.task = False, None, None

    def open(self, out: Path) -> None:
        ray = self.ray
        address = resolve_address(self.address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NormlabError(f"cannot join the Ray cluster at {address} ({first}); check --address") from None
        self.connected = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        if self.gpus is None:  # a GPU per run where there are GPUs and the runs may use them
            self.gpus = 1 if most_gpus >= 1 and self.opts.device != "cpu" else 0
        if self.gpus > most_gpus:
            raise NormlabError(f"--gpus-per-run {self.gpus:g} is more than the largest node of the Ray "
                               f"cluster has ({most_gpus:g} GPUs); lower it"
                               + ("" if most_gpus else ", or leave it out to train on CPUs"))
        if self.cpus > most_cpus:
            raise NormlabError(f"--cpus-per-run {self.cpus:g} is more than the largest node of the Ray "
                               f"cluster has ({most_cpus:g} CPUs); lower it")
        if self.opts.device == "cuda" and not self.gpus:
            raise NormlabError("--device cuda, but the Ray cluster has no GPUs; use --device auto or cpu")
        self.run_opts = options_for_nodes(self.opts, max(1, int(self.cpus)), self.gpus)
        self.nodes = nodes

    def prepare(self, out: Path) -> None:
        """Every live node must see `out` and be able to write it: checked with one task each."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex[:12]
        marker = out / f".normlab-probe-{token}"
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        try:
            rundir.atomic_write(marker, b"normlab checks that every Ray node can write here\n")
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(out.absolute()), token) for n in self.nodes]
            try:
                answers = ray.get(refs, timeout=PROBE_SECONDS)
            except ray.exceptions.GetTimeoutError:
                raise NormlabError(f"the Ray nodes did not answer within {PROBE_SECONDS} s; check the "
                                   f"cluster with `ray status`") from None
        except OSError as err:
            raise NormlabError(f"cannot write to {out} ({err.strerror}); choose a writable --out") from None
        finally:
            marker.unlink(missing_ok=True)
        problems = [a for a in answers if a]
        if problems:
            raise NormlabError(f"the Ray workers cannot use the results directory: {problems[0]}; --out must "
                               f"be a directory that every node shares and can write")

    def train(self, jobs: list[Job], display=None) -> Iterator[tuple[str, dict]]:
        ray = self.ray
        from ..train import STOP

        if self.channel is None:
            self.channel = ray.remote(num_cpus=0)(Channel).remote()
            self.task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus,
                                   max_retries=MAX_RETRIES)(_train_on_worker)
        todo, running, stopping = list(jobs), {}, False
        while todo or running:
            while todo and not stopping and (self.workers is None or len(running) < self.workers):
                job = todo.pop(0)
                running[self.task.remote(job, self.run_opts, self.channel)] = job
            finished, _ = ray.wait(list(running), num_returns=len(running), timeout=0.5)
            for ref in finished:
                job = running.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayError as err:  # retries exhausted, or the task was lost
                    lines = str(err).strip().splitlines()
                    error = f"Ray: {type(err).__name__}: {lines[0] if lines else ''}"
                    results = {run.run_id: {"state": "failed", "error": error} for run in job}
                yield from results.items()
            running_ids = {run.run_id for job in running.values() for run in job}
            for item in ray.get(self.channel.take.remote()):  # after the ends: never a finished run
                if display and item[0] in running_ids:
                    display.progress(*item)
            if STOP.is_set() and not stopping:  # the running runs checkpoint and stop
                stopping = True
                todo.clear()
                self.channel.stop.remote()

    def close(self) -> None:
        if self.connected:
            self.ray.shutdown()  # leaves the cluster; it keeps running
            self.connected = False
            self.channel = self.task = None
