"""Studies: named grids of runs, expanded from YAML, handed to a backend (backends/).

A preset (presets/*.yaml, or the user's own file) has `base` (RunConfig fields shared by every
run) and `studies`, each a list of grids: dicts whose list values are crossed; optional `rules`
set fields of the runs that match a condition (`when`: field -> value, or a list of values),
e.g. He et al.'s warm-up for ResNet-110 wherever it trains at their lr per image or above. Runs are
identified by their config, so a run shared by two studies is trained once. The runner skips
finished runs, resumes unfinished ones, and never runs one run twice at the same time
(each holds its run directory's lock), whichever backend trains them.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import rundir, yamlfile
from .config import MAX_RUNS, MAX_SEEDS, RunConfig, RuntimeOptions, brief
from .data import SIZES
from .errors import NormlabError
from .records import write_record

PRESET_KEYS = {"name", "description", "workers", "seeds", "base", "studies", "probes", "rules"}


@dataclass
class Study:
    name: str
    description: str
    workers: int
    runs: dict[str, RunConfig]           # run id -> config, in a stable order
    membership: dict[str, list[str]]     # study name -> run ids
    probes: bool | None = None           # the preset's choice; None: where they cost at most 5 % (probes.py)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("normlab.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if name_or_path not in preset_names() and path.is_dir():
        raise NormlabError(f"preset {name_or_path} is a directory; pass a .yaml file, or one of: "
                           f"{', '.join(preset_names())}")
    if name_or_path in preset_names():
        where = name_or_path
        preset = yamlfile.load(resources.files("normlab.presets").joinpath(f"{name_or_path}.yaml").read_text(), where)
    elif path.suffix in (".yaml", ".yml") and path.exists():
        preset, where = yamlfile.read(path), str(path)
    else:
        raise NormlabError(f"unknown preset '{name_or_path}'; use one of: {', '.join(preset_names())}, "
                           f"or the path of your own .yaml file")
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
        out[key.strip()] = yamlfile.load(value, f"--set {pair}")
    return out


def expand(name_or_path: str, *, seeds: int | None = None, overrides: dict | None = None,
           only: list[str] | None = None, batch_sizes: list[int] | None = None) -> Study:
    """Expand a preset into its runs. seeds/overrides/batch_sizes replace the preset's values.
    Everything is checked, and the number of runs bounded, before anything is expanded."""
    preset, where = read_preset(name_or_path)
    base = preset.get("base") or {}
    if not isinstance(base, dict):
        raise NormlabError(f"{where}: 'base' must be a mapping of run settings")
    base = {**base, **(overrides or {})}
    first_seed = base.get("seed", 0)
    if not isinstance(first_seed, int) or isinstance(first_seed, bool):
        raise NormlabError(f"{where}: 'seed' must be int, got {first_seed!r}")
    seeds = seeds if seeds is not None else preset.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
        raise NormlabError(f"{where}: 'seeds' must be a positive whole number, at most {MAX_SEEDS:,}, got {brief(seeds)}")
    workers = preset.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 1024:
        raise NormlabError(f"{where}: 'workers' must be a positive whole number, at most 1024, got {brief(workers)}")
    for key in ("name", "description"):
        if not isinstance(preset.get(key, ""), str):
            raise NormlabError(f"{where}: '{key}' must be text, got {preset[key]!r}")
    probes = preset.get("probes")
    if probes is not None and not isinstance(probes, bool):
        raise NormlabError(f"{where}: 'probes' must be true or false, got {brief(probes)}")
    studies = preset.get("studies")
    if not isinstance(studies, dict) or not studies or not all(isinstance(k, str) for k in studies):
        raise NormlabError(f"{where}: 'studies' must map study names to lists of grids")
    if only:
        missing = sorted(set(only) - set(studies))
        if missing:
            raise NormlabError(f"no study '{missing[0]}' in {where}; it has: {', '.join(studies)}")
        studies = {k: v for k, v in studies.items() if k in only}
    rules = read_rules(preset.get("rules"), where)
    grids_of = {}
    for study, grids in studies.items():
        grids_of[study] = []
        for grid in grids if isinstance(grids, list) else [grids]:
            if not isinstance(grid, dict) or not all(isinstance(k, str) for k in grid):
                raise NormlabError(f"{where}: study '{study}' must be a list of mappings (grids)")
            if batch_sizes and study == "batch-size":
                grid = {**grid, "batch_size": list(batch_sizes)}
            grids_of[study].append({k: v if isinstance(v, list) else [v] for k, v in grid.items()})
    check_size(grids_of, seeds, where)
    runs: dict[str, RunConfig] = {}
    membership: dict[str, list[str]] = {}
    for study, grids in grids_of.items():
        ids = membership.setdefault(study, [])
        for grid in grids:
            for combo in itertools.product(*grid.values()):
                for seed in range(seeds):
                    fields = {**base, **dict(zip(grid, combo)), "seed": first_seed + seed}
                    fields = apply_rules(rules, fields, overrides or {})
                    cfg = RunConfig.from_dict(fields, where=f"{where} ({study})").normalized().validate()
                    run_id = cfg.run_id()
                    runs.setdefault(run_id, cfg)
                    if run_id not in ids:
                        ids.append(run_id)
    return Study(preset.get("name", where), preset.get("description", ""), workers, runs, membership, probes)


def read_rules(rules, where: str) -> list[tuple[dict, dict]]:
    """A preset's rules as (when, set) pairs, checked: both mappings of RunConfig fields."""
    if rules is None:
        return []
    known = set(RunConfig.__dataclass_fields__)
    shape = f"{where}: 'rules' must be a list of {{when: {{field: value}}, set: {{field: value}}}}"
    if not isinstance(rules, list):
        raise NormlabError(shape)
    out = []
    for rule in rules:
        if not isinstance(rule, dict) or set(rule) != {"when", "set"} or \
                not all(isinstance(rule[k], dict) and rule[k] for k in ("when", "set")):
            raise NormlabError(shape)
        unknown = sorted((set(rule["when"]) | set(rule["set"])) - known)
        if unknown:
            raise NormlabError(f"{where}: a rule names '{unknown[0]}', which is not a run setting")
        out.append((rule["when"], rule["set"]))
    return out


def apply_rules(rules: list[tuple[dict, dict]], fields: dict, overrides: dict) -> dict:
    """The run's fields with each matching rule's settings; a rule any of whose settings --set
    gives is left out (--set wins)."""
    defaults = RunConfig()
    for when, settings in rules:
        def holds(key, wanted):
            value = fields.get(key, getattr(defaults, key))
            return value in wanted if isinstance(wanted, list) else value == wanted
        if all(holds(k, v) for k, v in when.items()) and not set(settings) & set(overrides):
            fields = {**fields, **settings}
    return fields


def check_size(grids_of: dict[str, list[dict]], seeds: int, where: str) -> None:
    """Refuse, before anything is expanded, a study of more than MAX_RUNS runs (the paper's
    has 54): a short file could otherwise ask for billions."""
    total = 0
    for grid in (g for grids in grids_of.values() for g in grids):
        if any(not v for v in grid.values()):
            continue  # an empty list: no runs
        size = seeds
        for values in grid.values():
            size = min(size * len(values), MAX_RUNS + 1)
        total += size
        if total > MAX_RUNS:
            raise NormlabError(f"{where}: the studies ask for more than the {MAX_RUNS:,} runs normlab runs "
                               f"in one study (seeds times the product of each grid's lists); split the "
                               f"study, or use fewer values or seeds")


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
    """The run's status; a directory holding another config, or a config that is not
    normlab's, never counts as this run's result (training it says why, in one line)."""
    try:
        info = rundir.load_json(run_dir / rundir.CONFIG)
    except FileNotFoundError:
        info = None
    except rundir.Unreadable:
        return {"state": "config unreadable"}
    if info and info.get("config") != cfg.to_dict():
        return {"state": "config differs"}
    return rundir.read_status(run_dir / rundir.STATUS) or {"state": "new"}


def plan_arrays(runs: dict[str, RunConfig], todo: list[str], size) -> list[tuple[str, ...]]:
    """The runs `todo` as jobs: runs that differ only in their seeds go together, at most
    size(cfg) of them (1: each alone), in the order of `todo` (a job where its first run is)."""
    from .train import fusable

    groups: dict[RunConfig, list[str]] = {}
    for rid in todo:
        groups.setdefault(dataclasses.replace(runs[rid], seed=0), []).append(rid)
    jobs = []
    for key, ids in groups.items():
        limit = 1 if fusable(key.norm) else max(1, size(key))
        ids.sort(key=lambda rid: runs[rid].seed)
        jobs += [tuple(ids[i:i + limit]) for i in range(0, len(ids), limit)]
    first = {rid: i for i, rid in enumerate(todo)}
    return sorted(jobs, key=lambda job: first[job[0]])


def run_study(study: Study, out: Path, opts: RuntimeOptions, workers: int = 1, display=None,
              force: bool = False, backend=None, array_size=lambda cfg: 1) -> dict[str, dict]:
    """Train every unfinished run of the study into out/<run-id>/ with a backend (by default a
    local pool of `workers` processes). Runs that differ only in their seeds train as arrays of
    at most array_size(cfg) runs where the backend takes arrays. Returns run id -> status.

    The rules every backend shares live here: finished runs are skipped, unfinished ones
    resume from their checkpoints, and a run that another process is training is waited for,
    then tried again (its lock guarantees that it is never trained twice at once)."""
    from .backends.base import RunJob
    from .backends.local import LocalBackend
    from .train import STOP

    out = rundir.confine(out)  # no link followed below the results directory
    owned = backend is None
    backend = backend or LocalBackend(opts, workers)
    try:
        backend.open(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NormlabError(f"cannot write to {out} ({err.strerror}); choose a writable --out") from None
        backend.prepare(out)
        write_record(out, study.name, study.description, study.membership,
                     {k: c.to_dict() for k, c in study.runs.items()})
        results = {rid: run_status(out / rid, cfg) for rid, cfg in study.runs.items()}
        todo = [rid for rid in study.runs if results[rid]["state"] not in rundir.FINISHED]
        todo.sort(key=lambda rid: -relative_cost(study.runs[rid]))  # longest first: less idle at the end
        if display:
            display.start(study, results, todo)
        while todo and not STOP.is_set():
            size = array_size if backend.arrays else (lambda cfg: 1)
            jobs = [tuple(RunJob(rid, study.runs[rid].to_dict(), str((out / rid).absolute()), force) for rid in job)
                    for job in plan_arrays(study.runs, todo, size)]
            waiting = []
            for rid, result in backend.train(jobs, display):
                if result.get("state") == "busy":  # held by another process: wait for it
                    waiting.append(rid)
                    if display:
                        display.defer(rid)
                    continue
                results[rid] = result
                if display:
                    display.end(rid, result)
            if backend.detached:
                break
            todo = _wait_for_holders(study, out, waiting, results, display)
        return results
    finally:
        if owned:
            backend.close()


def _wait_for_holders(study: Study, out: Path, waiting: list[str], results: dict, display) -> list[str]:
    """Runs that other processes were training: those now finished are settled, the rest are
    tried again after a second (their lock is free again if the holder died)."""
    from .train import STOP

    if not waiting or STOP.is_set():
        return []
    time.sleep(1.0)
    again = []
    for rid in waiting:
        status = run_status(out / rid, study.runs[rid])
        if status["state"] in rundir.FINISHED:
            results[rid] = status
            if display:
                display.end(rid, status)
        else:
            again.append(rid)
    return again
