"""Run directories as the report sees them: runs, points (the seeds of one config), studies.

A damaged run directory (config.json or metrics.csv unreadable or invalid) is skipped with
one warning line naming it; the rest of the report goes on.
"""
from __future__ import annotations

import collections
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import rundir
from ..config import RunConfig
from ..data import SOURCES
from ..errors import NormlabError, one_line
from ..stats import Summary, summarize
from .escape import markdown
from .labels import family, variant

Warn = Callable[[str], None]
METRIC_COLUMNS = ("epoch", "train_error", "test_error")  # what the report cannot do without
ERROR_COLUMNS = ("train_error", "val_error", "test_error")  # percentages, drawn and summarized


@dataclass
class Run:
    id: str
    path: Path
    cfg: RunConfig
    info: dict
    rows: list[dict]
    status: dict

    @property
    def state(self) -> str:
        return self.status.get("state", "new")

    @property
    def final(self) -> float | None:
        """The GN paper's number: median test error of the final epochs (finished runs only;
        how many epochs: rundir.final_epochs)."""
        if self.state != "done" or not self.rows:
            return None
        return rundir.summarize(self.rows, self.cfg.epochs)["median_final5_test_error"]

    @property
    def value(self) -> float | None:
        """What the run counts as in every mean, interval and test (the divergence rule): its
        final error when done, chance error when it diverged (see `chance_error`), and nothing
        while unfinished or when it failed (a crash says nothing about the norm)."""
        if self.state == "diverged":
            return chance_error(self.cfg.data)
        return self.final


def chance_error(data: str) -> float:
    """The test error (%) of a diverged run: its weights are not finite, so its logits are NaN
    and every image gets the same class (argmax of NaNs); on the balanced CIFAR test sets that
    is 100 · (1 − 1/classes): 90 % on CIFAR-10, 99 % on CIFAR-100."""
    return 100.0 * (1 - 1 / (SOURCES[data].num_classes if data in SOURCES else 10))


@dataclass
class Point:
    """The seeds of one configuration."""
    cfg: RunConfig
    runs: list[Run] = field(default_factory=list)

    @property
    def finals(self) -> list[float]:
        """One value per seed that counts (Run.value: diverged seeds at chance error)."""
        return [r.value for r in self.runs if r.value is not None]

    @property
    def by_seed(self) -> dict[int, float]:
        """Seed -> value, for tests that pair seeds across points (stats.contrast)."""
        return {r.cfg.seed: r.value for r in self.runs if r.value is not None}

    def seed_note(self) -> str:
        """'1 of 3 seeds diverged, counted at 90 % error', '1 of 3 failed (left out)', '1 of 3 running
        (left out)', ...; '' when every seed finished."""
        states, n = self.states(), len(self.runs)
        notes = []
        if states["diverged"]:
            notes.append(f"{states['diverged']} of {n} seed{'s' if n > 1 else ''} diverged, "
                         f"counted at {chance_error(self.cfg.data):g} % error")
        if states["failed"]:
            notes.append(f"{states['failed']} of {n} failed (left out)")
        for state, count in states.items():  # running, interrupted, not started: no result yet
            if state not in ("done", "diverged", "failed"):
                notes.append(f"{count} of {n} {markdown(state)} (left out)")
        return "; ".join(notes)

    @property
    def norm(self) -> str:
        """The norm as the report tells it apart (with PreciseBN as a variant: labels.variant)."""
        return variant(self.cfg)

    def summary(self) -> Summary | None:
        """Mean, std and 95 % interval over the finished seeds (no interval with one)."""
        return summarize(self.finals)

    def states(self) -> collections.Counter:
        return collections.Counter(r.state for r in self.runs)

    def band(self, column: str) -> tuple[list[int], list[float], list[float] | None, list[float] | None]:
        """Per epoch, over the epochs every seed has: mean and its 95 % interval (None with one
        seed)."""
        rows = [r.rows for r in self.runs if r.rows]
        if not rows:
            return [], [], None, None
        n = min(len(r) for r in rows)
        epochs = [rows[0][i]["epoch"] for i in range(n)]
        summaries = [summarize([r[i].get(column, math.nan) for r in rows]) for i in range(n)]
        means = [s.mean if s else math.nan for s in summaries]
        if len(rows) < 2 or not all(s and s.has_interval for s in summaries):
            return epochs, means, None, None
        return epochs, means, [s.low for s in summaries], [s.high for s in summaries]

    def curve(self, column: str) -> tuple[list[int], list[float]]:
        """Mean over seeds of a metric per epoch, over the epochs every seed has."""
        epochs, means, _, _ = self.band(column)
        return epochs, means


def warn_stderr(message: str) -> None:
    import sys
    print(f"normlab: warning: {one_line(message)}", file=sys.stderr)


def load_runs(root: Path, warn: Warn = warn_stderr) -> list[Run]:
    """Every readable run under root; each damaged one is skipped with one warning."""
    runs = []
    for path in rundir.list_runs(root):
        try:
            runs.append(read_run(path, warn))
        except DamagedRun as err:
            warn(f"skipping {path}: {err}; repair that directory, or move it away and run the "
                 f"study again to retrain the run")
        except FileNotFoundError:
            continue  # removed while we were reading
    return runs


class DamagedRun(Exception):
    pass


def read_run(path: Path, warn: Warn) -> Run:
    try:
        info = rundir.load_json(path / rundir.CONFIG)  # bounded, regular files only, no links
    except rundir.Unreadable as err:
        raise DamagedRun(str(err)) from None
    if not isinstance(info.get("config"), dict):
        raise DamagedRun(f"{rundir.CONFIG} has no 'config' mapping")
    if not isinstance(info.get("data", {}), dict) or not isinstance(info.get("run_id", ""), str):
        raise DamagedRun(f"{rundir.CONFIG} has a 'data' that is not a mapping or a 'run_id' that is not text")
    try:
        cfg = RunConfig.from_dict(info["config"], where=rundir.CONFIG).validate()
    except NormlabError as err:
        raise DamagedRun(str(err)) from None
    rows = read_metrics(path / rundir.METRICS)
    try:
        status = rundir.load_json(path / rundir.STATUS)
    except FileNotFoundError:
        status = {}
    except rundir.Unreadable as err:
        warn(f"{err}; the run is counted as unfinished")
        status = {}
    if not isinstance(status.get("state", "new"), str) or len(status.get("state", "")) > 40:
        warn(f"{path}: {rundir.STATUS} holds no valid state; the run is counted as unfinished")
        status = {}
    return Run(str(info.get("run_id", path.name)), path, cfg, info, rows, status)


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv as rows of floats (epoch an int); [] when absent (no epoch finished yet)."""
    try:
        with io.StringIO(rundir.read_text(path), newline="") as f:  # bounded, regular files only
            reader = csv.DictReader(f)
            missing = [c for c in METRIC_COLUMNS if c not in (reader.fieldnames or [])]
            if reader.fieldnames and missing:
                raise DamagedRun(f"{rundir.METRICS} has no '{missing[0]}' column")
            rows = []
            for line, row in enumerate(reader, 2):
                if None in row or any(v is None for v in row.values()):
                    raise DamagedRun(f"{rundir.METRICS} line {line} has the wrong number of fields")
                try:
                    parsed = {k: float(v) if v != "" else math.nan for k, v in row.items()}
                except ValueError:
                    raise DamagedRun(f"{rundir.METRICS} line {line} holds a value that is not a number") from None
                parsed["epoch"] = int(parsed["epoch"]) if math.isfinite(parsed["epoch"]) else -1
                if parsed["epoch"] < 1:
                    raise DamagedRun(f"{rundir.METRICS} line {line} has no valid epoch number")
                if not all(0 <= parsed[c] <= 100 for c in ERROR_COLUMNS if c in parsed):  # NaN, inf too
                    raise DamagedRun(f"{rundir.METRICS} line {line} has an error that is not a percentage")
                rows.append(parsed)
            return rows
    except FileNotFoundError:
        return []
    except rundir.Unreadable as err:
        raise DamagedRun(str(err)) from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DamagedRun(f"{rundir.METRICS} is unreadable ({short(err)})") from None


def short(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err).splitlines()[0]


def point_key(cfg: RunConfig) -> str:
    """The run id the config would have with seed 0: equal for runs that differ only in seed."""
    return RunConfig(**{**cfg.to_dict(), "milestones": cfg.milestones, "seed": 0}).run_id()


def group_points(runs: list[Run]) -> dict[str, Point]:
    """Runs that differ only in their seed form one point."""
    points: dict[str, Point] = {}
    for run in runs:
        points.setdefault(point_key(run.cfg), Point(run.cfg)).runs.append(run)
    return points


def infer_membership(runs: list[Run]) -> dict[str, set[str]]:
    """Study name -> run ids for runs that no study record names: the norms at the most common
    batch size, the norms run at several batch sizes, the GN variants at the common one."""
    batches = collections.Counter((r.cfg.batch_size, r.cfg.virtual_gpus) for r in runs)
    common = batches.most_common(1)[0][0] if batches else None
    at_common = {r.id for r in runs if (r.cfg.batch_size, r.cfg.virtual_gpus) == common}
    norms_at = collections.defaultdict(set)
    for r in runs:
        norms_at[r.cfg.norm].add(r.cfg.batch_size)
    return {"norms": at_common,
            "batch-size": {r.id for r in runs if len(norms_at[r.cfg.norm]) > 1},
            "groups": {r.id for r in runs if r.id in at_common and family(r.cfg.norm) != "bn"}}
