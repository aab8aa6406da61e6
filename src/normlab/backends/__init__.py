"""Where a study's runs are trained: this machine, a Ray cluster or a SLURM cluster.

Every backend has one small interface (base.Backend: "train these runs, tell me as they
finish"); study.py keeps the rules they share (skip finished runs, resume unfinished ones,
wait for runs that another process holds). Ray and submitit are extras, imported only when
their backend is chosen.
"""
from __future__ import annotations

from ..config import RuntimeOptions
from ..errors import NormlabError
from .base import Backend, Job, RunJob, train_job

BACKENDS = ("local", "ray", "slurm")
# options that only some backends take, checked so that a misplaced one is not silently ignored
ONLY = {"address": ("ray",), "cpus_per_run": ("ray", "slurm"), "gpus_per_run": ("ray", "slurm"),
        "partition": ("slurm",), "time_limit": ("slurm",), "sbatch": ("slurm",), "wait": ("slurm",)}
FLAGS = {"address": "--address", "cpus_per_run": "--cpus-per-run", "gpus_per_run": "--gpus-per-run",
         "partition": "--partition", "time_limit": "--time", "sbatch": "--sbatch", "wait": "--no-wait"}


def make_backend(name: str, opts: RuntimeOptions, workers: int | None = None, **options) -> Backend:
    """The backend `name` with its options (those left at None are the backend's defaults)."""
    given = {k: v for k, v in options.items() if v is not None and not (k == "wait" and v)}
    for key in given:
        if name not in ONLY[key]:
            raise NormlabError(f"{FLAGS[key]} is for --backend {' or '.join(ONLY[key])}, not {name}")
    if name == "local":
        return _local(opts, workers)
    if name == "ray":
        from .ray import RayBackend
        return RayBackend(opts, workers=workers, **given)
    if name == "slurm":
        from .slurm import SlurmBackend
        return SlurmBackend(opts, workers=workers, **given)
    raise NormlabError(f"unknown backend '{name}'; use one of: {', '.join(BACKENDS)}")


def parse_sbatch(pairs: list[str] | None) -> dict | None:
    """--sbatch KEY=VALUE pairs: sbatch options for every task of a SLURM array."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise NormlabError(f"--sbatch expects KEY=VALUE (an sbatch option without its dashes), got '{pair}'")
        out[key.strip().lstrip("-")] = value
    return out


def _local(opts: RuntimeOptions, workers: int | None) -> Backend:
    from .local import LocalBackend
    return LocalBackend(opts, workers or 1)


__all__ = ["BACKENDS", "Backend", "Job", "RunJob", "make_backend", "parse_sbatch", "train_job"]
