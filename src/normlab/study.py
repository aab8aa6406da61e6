"""Studies: named grids of runs, expanded from YAML, run by a local pool of workers.

A preset (presets/*.yaml, or the user's own file) has `base` (RunConfig fields shared by every
run) and `studies`, each a list of grids: dicts whose list values are crossed. Runs are
identified by their config, so a run shared by two studies is trained once. The runner skips
finished runs, resumes unfinished ones, and never runs one run twice at the same time
(each holds its run directory's lock).
"""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import queue
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from . import rundir
from .config import RunConfig, RuntimeOptions
from .data import SIZES
from .errors import NormlabError

PRESET_KEYS = {"name", "description", "workers", "seeds", "base", "studies"}


@dataclass
class Study:
    name: str
    description: str
    workers: int
    runs: dict[str, RunConfig]           # run id -> config, in a stable order
    membership: dict[str, list[str]]     # study name -> run ids


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("normlab.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if name_or_path not in preset_names() and path.is_dir():
        raise NormlabError(f"preset {name_or_path} is a directory; pass a .yaml file, or one of: "
                           f"{', '.join(preset_names())}")
    if name_or_path in preset_names():
        text, where = resources.files("normlab.presets").joinpath(f"{name_or_path}.yaml").read_text(), name_or_path
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        raise NormlabError(f"unknown preset '{name_or_path}'; use one of: {', '.join(preset_names())}, "
                           f"or the path of your own .yaml file")
    try:
        preset = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise NormlabError(f"{where} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(preset, dict):
        raise NormlabError(f"{where}: expected a mapping with keys {', '.join(sorted(PRESET_KEYS))}")
    unknown = sorted(set(preset) - PRESET_KEYS)
    if unknown:
        raise NormlabError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(PRESET_KEYS))}")
    return preset, where


def parse_overrides(pairs: list[str]) -> dict:
    """--set key=value pairs, values read as YAML (numbers, lists, booleans)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise NormlabError(f"--set expects key=value, got '{pair}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise NormlabError(f"--set {pair}: cannot read the value") from None
    return out


def expand(name_or_path: str, *, seeds: int | None = None, overrides: dict | None = None,
           only: list[str] | None = None, batch_sizes: list[int] | None = None) -> Study:
    """Expand a preset into its runs. seeds/overrides/batch_sizes replace the preset's values."""
    preset, where = read_preset(name_or_path)
    base = dict(preset.get("base") or {})
    if not isinstance(base, dict):
        raise NormlabError(f"{where}: 'base' must be a mapping of run settings")
    base.update(overrides or {})
    seeds = seeds if seeds is not None else preset.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise NormlabError(f"{where}: 'seeds' must be a positive whole number, got {seeds!r}")
    workers = preset.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise NormlabError(f"{where}: 'workers' must be a positive whole number, got {workers!r}")
    studies = preset.get("studies")
    if not isinstance(studies, dict) or not studies:
        raise NormlabError(f"{where}: 'studies' must map study names to lists of grids")
    if only:
        missing = sorted(set(only) - set(studies))
        if missing:
            raise NormlabError(f"no study '{missing[0]}' in {where}; it has: {', '.join(studies)}")
        studies = {k: v for k, v in studies.items() if k in only}
    runs: dict[str, RunConfig] = {}
    membership: dict[str, list[str]] = {}
    for study, grids in studies.items():
        grids = grids if isinstance(grids, list) else [grids]
        ids = membership.setdefault(study, [])
        for grid in grids:
            if not isinstance(grid, dict):
                raise NormlabError(f"{where}: study '{study}' must be a list of mappings (grids)")
            grid = dict(grid)
            if batch_sizes and study == "batch-size":
                grid["batch_size"] = list(batch_sizes)
            keys = list(grid)
            values = [v if isinstance(v, list) else [v] for v in grid.values()]
            for combo in itertools.product(*values):
                for seed in range(seeds):
                    fields = {**base, **dict(zip(keys, combo)), "seed": base.get("seed", 0) + seed}
                    cfg = RunConfig.from_dict(fields, where=f"{where} ({study})").normalized().validate()
                    run_id = cfg.run_id()
                    runs.setdefault(run_id, cfg)
                    if run_id not in ids:
                        ids.append(run_id)
    return Study(preset.get("name", where), preset.get("description", ""), workers, runs, membership)


def steps_per_epoch(cfg: RunConfig) -> int:
    """Steps per epoch on the data set's nominal size (the last partial step is dropped)."""
    return (SIZES[cfg.data][0] - cfg.val_split) // cfg.images_per_step


def images_per_run(cfg: RunConfig) -> tuple[int, int]:
    """(images trained, images evaluated) over the whole run: the cost of a run."""
    return (cfg.epochs * steps_per_epoch(cfg) * cfg.images_per_step,
            cfg.epochs * (SIZES[cfg.data][1] + cfg.val_split))


def relative_cost(cfg: RunConfig) -> float:
    """Rough training time: images, times a per-step overhead that dominates small batches."""
    depth = int(cfg.model[6:])
    return images_per_run(cfg)[0] * depth * (1 + 8 / cfg.images_per_step)


def run_status(run_dir: Path, cfg: RunConfig) -> dict:
    """The run's status; a directory holding another config never counts as this run's result."""
    info = rundir.read_json(run_dir / rundir.CONFIG)
    if info and info.get("config") != cfg.to_dict():
        return {"state": "config differs"}
    return rundir.read_json(run_dir / rundir.STATUS) or {"state": "new"}


# -- workers -----------------------------------------------------------------------------------
_progress_queue = None


def _worker_init(progress_queue, threads: int | None) -> None:
    """In each worker process: report progress to the parent; checkpoint on signals."""
    global _progress_queue
    _progress_queue = progress_queue
    if threads:
        import torch
        torch.set_num_threads(threads)
    from .engine import STOP
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: STOP.set())


def train_one(cfg_dict: dict, run_dir: str, opts: RuntimeOptions, force: bool = False) -> dict:
    """Train one run; never raises for the run's own failures (they are its status)."""
    from .engine import Interrupted, RunBusy, train

    cfg = RunConfig.from_dict(cfg_dict)
    last = [0.0]

    def on_progress(run):
        now = time.monotonic()
        if _progress_queue is not None and (now - last[0] > 0.5 or run.step == run.steps):
            last[0] = now
            _progress_queue.put((cfg.run_id(), run.epoch, run.step, run.steps))

    try:
        return train(cfg, run_dir, opts, force=force, on_progress=on_progress)
    except Interrupted:
        return {"state": "interrupted"}
    except RunBusy:
        return {"state": "busy"}
    except NormlabError as err:
        return {"state": "failed", "error": str(err)}
    except Exception as err:  # a crash in one run must not stop the study; it is recorded
        return {"state": "failed", "error": f"{type(err).__name__}: {err}"}


def run_study(study: Study, out: Path, opts: RuntimeOptions, workers: int, display=None,
              force: bool = False) -> dict[str, dict]:
    """Train every unfinished run of the study into out/<run-id>/. Returns run id -> status."""
    from .engine import STOP

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        rundir.remove_stale_temps(out)  # left by a study killed while writing study.json
        rundir.write_json(out / "study.json", {
            "name": study.name, "description": study.description,
            "studies": study.membership, "runs": {k: c.to_dict() for k, c in study.runs.items()}})
    except OSError as err:
        raise NormlabError(f"cannot write to {out} ({err.strerror}); choose a writable --out") from None
    results = {rid: run_status(out / rid, cfg) for rid, cfg in study.runs.items()}
    pending = [rid for rid in study.runs if results[rid]["state"] not in rundir.FINISHED]
    pending.sort(key=lambda rid: -relative_cost(study.runs[rid]))  # longest first: less idle at the end
    if display:
        display.start(study, results, pending)
    if not pending:
        return results
    threads = opts.threads
    gpus = 0
    if opts.device in ("auto", "cuda"):
        import torch
        gpus = torch.cuda.device_count()
    if not threads and not gpus:
        threads = max(1, (os.cpu_count() or 1) // workers)
    todo, waiting = list(pending), []

    def settle(rid: str, result: dict) -> None:
        """Record a run's outcome; one held by another process is retried later."""
        if result.get("state") == "busy":
            waiting.append(rid)
            if display:
                display.defer(rid)
            return
        results[rid] = result
        if display:
            display.end(rid, result)

    def next_round() -> bool:
        """When only runs held elsewhere are left, wait for their holders, then retry."""
        if todo or not waiting or STOP.is_set():
            return bool(todo)
        time.sleep(1.0)
        for rid in list(waiting):
            status = run_status(out / rid, study.runs[rid])
            if status["state"] in rundir.FINISHED:
                waiting.remove(rid)
                settle(rid, status)
        todo.extend(waiting)
        waiting.clear()
        return bool(todo)

    if workers == 1:  # in this process: the CLI's signal handlers stay in charge
        opts_run = dataclasses.replace(opts, threads=threads, progress=False)
        while todo or next_round():
            rid = todo.pop(0)
            if STOP.is_set():
                break
            if display:
                display.begin(rid)
            settle(rid, _train_inline(study.runs[rid], out / rid, opts_run, display, force))
        return results
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(progress_queue, threads)) as pool:
        futures, slot, stopping = {}, 0, False
        while todo or futures or next_round():
            while todo and len(futures) < workers and not STOP.is_set():
                rid = todo.pop(0)
                device = f"cuda:{slot % gpus}" if gpus else opts.device
                slot += 1
                run_opts = dataclasses.replace(opts, device=device, threads=threads, progress=False)
                futures[pool.submit(train_one, study.runs[rid].to_dict(), str(out / rid), run_opts, force)] = rid
                if display:
                    display.begin(rid)
            if STOP.is_set() and not stopping:  # forward the stop to the workers once
                stopping = True
                todo.clear()
                for process in list(getattr(pool, "_processes", {}).values()):
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGTERM)
            done, _ = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(progress_queue, display)
            for future in done:
                rid = futures.pop(future)
                settle(rid, future.result())
    return results


def _train_inline(cfg: RunConfig, run_dir: Path, opts: RuntimeOptions, display, force: bool) -> dict:
    global _progress_queue

    class Direct:
        def put(self, item):
            if display:
                display.progress(*item)
    _progress_queue = Direct()
    try:
        return train_one(cfg.to_dict(), str(run_dir), opts, force)
    finally:
        _progress_queue = None


def _drain(progress_queue, display) -> None:
    while True:
        try:
            item = progress_queue.get_nowait()
        except (queue.Empty, OSError, EOFError):
            return
        if display:
            display.progress(*item)
