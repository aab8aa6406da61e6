"""Each run's probes.csv (normlab/probes.py) as the report reads it: raw rows for the tidy
probes.csv, and one summary per run for the section "Inside the network".

A damaged probes.csv (unreadable, a missing column, a value that is not a number) is skipped
with one warning naming it, once per file; the run's other results are kept.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..probes import FIELDS, PROBES
from .runs import Run, Warn

# Per-epoch summaries of the per-layer probes: name -> (probe, how the layers are combined)
TRENDS = {
    "batch_mean_shift": ("batch_mean_shift", "mean"),
    "batch_log_std_ratio": ("batch_log_std_ratio", "mean"),
    "last_block_input_rms": ("block_input_rms", "deepest"),
    "branch_skip_ratio": ("branch_skip_ratio", "mean"),
    "grad_norm": ("grad_norm", "mean"),
    "feature_effective_rank": ("feature_effective_rank", "mean"),
    "feature_mean_cosine": ("feature_mean_cosine", "mean"),
}
PER_LAYER = ("batch_mean_shift", "batch_log_std_ratio", "block_input_rms", "branch_skip_ratio", "grad_norm")
TEST_ERRORS = {"batch": "test_error_batch_stats", "population": "test_error_population_stats"}


class DamagedProbes(Exception):
    pass


def read_rows(path: Path) -> list[dict]:
    """probes.csv as rows (epoch and depth int, depth None for whole-model probes, value
    float); [] when there is none. Raises DamagedProbes."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and list(reader.fieldnames) != list(FIELDS):
                raise DamagedProbes(f"{PROBES} has the columns {', '.join(reader.fieldnames)}, not "
                                    f"{', '.join(FIELDS)}")
            rows = []
            for line, r in enumerate(reader, 2):
                try:
                    rows.append({"epoch": int(r["epoch"]), "layer": r["layer"],
                                 "depth": int(r["depth"]) if r["depth"] else None, "probe": r["probe"],
                                 "value": float(r["value"]) if r["value"] != "" else math.nan})
                except (TypeError, ValueError):
                    raise DamagedProbes(f"{PROBES} line {line} is not a probe row") from None
            return rows
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DamagedProbes(f"{PROBES} is unreadable ({getattr(err, 'strerror', None) or err})") from None


_warned: set[str] = set()


def rows_of(run: Run, warn: Warn | None) -> list[dict]:
    """A run's probe rows; a damaged file gives [] and one warning (the first time it is read)."""
    try:
        return read_rows(run.path / PROBES)
    except DamagedProbes as err:
        key = str(run.path / PROBES)
        if warn is not None and key not in _warned:
            _warned.add(key)
            warn(f"{run.path}: {err}; its probes are left out of the report (the run's results are kept)")
        return []


@dataclass
class RunProbes:
    """One run's probes: per-epoch summaries, per-layer values at its last epoch, test errors."""
    epochs: list[int] = field(default_factory=list)
    trends: dict[str, list[float]] = field(default_factory=dict)        # name -> one value per epoch
    final: dict[str, dict[int, float]] = field(default_factory=dict)    # probe -> depth -> value
    test_errors: dict[str, dict[int, float]] = field(default_factory=dict)  # batch/population -> epoch -> %

    def gap(self) -> float | None:
        """The run's statistic gap: the mean over its layers of the batch mean shift at its last epoch."""
        values = list(self.final.get("batch_mean_shift", {}).values())
        return statistics.fmean(values) if values else None

    def final_test_error(self, kind: str) -> float | None:
        """The test error with 'batch' or 'population' statistics at test time: the median over
        the last 5 epochs that measured it."""
        by_epoch = self.test_errors.get(kind, {})
        values = [by_epoch[e] for e in sorted(by_epoch)[-5:]]
        return statistics.median(values) if values else None


def summarize(rows: list[dict]) -> RunProbes:
    out = RunProbes()
    by_epoch: dict[int, dict[str, dict[int | None, float]]] = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], {}).setdefault(r["probe"], {})[r["depth"]] = r["value"]
    for kind, probe in TEST_ERRORS.items():
        out.test_errors[kind] = {e: p[probe][None] for e, p in by_epoch.items() if None in p.get(probe, {})}
    epochs = sorted(e for e, p in by_epoch.items() if any(probe in p for probe, _ in TRENDS.values()))
    out.epochs = epochs
    for name, (probe, how) in TRENDS.items():
        series = []
        for e in epochs:
            values = by_epoch[e].get(probe, {})
            if not values:
                series.append(math.nan)
            elif how == "deepest":
                series.append(values[max(values, key=lambda d: -1 if d is None else d)])
            else:
                series.append(statistics.fmean(values.values()))
        if any(not math.isnan(v) for v in series):
            out.trends[name] = series
    if epochs:
        last = by_epoch[epochs[-1]]
        out.final = {probe: dict(last[probe]) for probe in PER_LAYER if probe in last}
    return out


def load(runs: list[Run], warn: Warn | None) -> dict[str, RunProbes]:
    """Run id -> its probes, for the runs that have any."""
    out = {}
    for run in runs:
        rows = rows_of(run, warn)
        if rows:
            out[run.id] = summarize(rows)
    return out
