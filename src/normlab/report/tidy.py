"""Tidy results for notebooks: results.csv (one row per run), curves.csv (one row per run and
epoch) and probes.csv (one row per run, epoch, layer and probe), plain CSV that pandas and
polars read as they are, and `load_results`."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from pathlib import Path
from typing import NamedTuple

from .. import rundir
from ..config import RunConfig
from ..errors import NormlabError
from ..probes import FIELDS as PROBE_FIELDS
from .escape import csv_cell, plain
from .labels import family, label, sweep_value, variant
from .probe_data import rows_of
from .runs import Run, Warn, load_runs, warn_stderr
from .studies import membership, studies_of

RESULTS, CURVES, PROBES = "results.csv", "curves.csv", "probes.csv"
CURVE_KEYS = ("run_id", "model", "norm", "batch_size", "virtual_gpus", "seed")
PROBE_KEYS = list(CURVE_KEYS) + list(PROBE_FIELDS)


def value(v) -> str:
    """A CSV cell: blank for missing and non-finite numbers, milestones as '82 123'."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (bool, int, float)):
        return str(v)
    if isinstance(v, (tuple, list)):
        return csv_cell(" ".join(plain(x) for x in v))
    return csv_cell(plain(v, limit=1000))  # text from files: one line, never a formula


def run_row(run: Run, root: Path, studies: dict[str, list[str]]) -> dict:
    cfg, rows, summary = run.cfg, run.rows, rundir.summarize(run.rows, run.cfg.epochs)
    row = {"run_id": run.id, "path": str(run.path.relative_to(root)) if run.path != root else ".",
           "studies": " ".join(studies.get(run.id, [])),  # 'quick/norms quick/groups'
           "state": run.state}
    row.update(dataclasses.asdict(cfg))  # every config field, the later ones too: stable columns
    row.update({"lr": cfg.lr, "images_per_step": cfg.images_per_step, "norm_label": label(variant(cfg)),
                "norm_family": family(variant(cfg)), "groups": sweep_value(cfg.norm, "groups"),
                "channels_per_group": sweep_value(cfg.norm, "per_group"),
                "epochs_done": len(rows),
                "final_test_error": run.final,
                "final_epochs": summary.get("final_epochs") if run.final is not None else None,
                "final_train_error": summary.get("median_final5_train_error") if run.final is not None else None,
                "final_val_error": summary.get("median_final5_val_error") if run.final is not None else None,
                "last_test_error": rows[-1]["test_error"] if rows else None,
                "diverged_in_epoch": run.status.get("diverged_in_epoch"),
                "train_seconds": sum(r.get("seconds", 0) for r in rows) if rows else None,
                "images_per_s": statistics.median(r["images_per_s"] for r in rows) if rows and "images_per_s" in rows[0] else None,
                "device": run.info.get("device"), "torch": run.info.get("torch"),
                "data_images": (run.info.get("data") or {}).get("train"),
                "batch_semantics": run.info.get("batch_semantics")})
    return row


def head(run: Run) -> dict:
    return {"run_id": run.id, "model": run.cfg.model, "norm": run.cfg.norm, "batch_size": run.cfg.batch_size,
            "virtual_gpus": run.cfg.virtual_gpus, "seed": run.cfg.seed}


def curve_rows(run: Run) -> list[dict]:
    return [{**head(run), **r} for r in run.rows]


def to_csv(rows: list[dict], fields: list[str] | None = None) -> str:
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # union, in order of appearance
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows({k: value(v) for k, v in r.items()} for r in rows)
    return buffer.getvalue()


def tables(root: Path, runs: list[Run], warn: Warn | None = None) -> tuple[str, str, str]:
    """(results.csv, curves.csv, probes.csv) as text."""
    studies = membership(studies_of(root, runs))
    order = sorted(runs, key=lambda r: r.id)
    results_fields = None if order else ["run_id", "path", "studies", "state"] + [f.name for f in dataclasses.fields(RunConfig)]
    curves = [row for r in order for row in curve_rows(r)]
    probes = [{**head(r), **p} for r in order for p in rows_of(r, warn)]
    return (to_csv([run_row(r, root, studies) for r in order], results_fields),
            to_csv(curves, None if curves else list(CURVE_KEYS) + ["epoch"]),
            to_csv(probes, PROBE_KEYS))


def write(root: Path, runs: list[Run], out: Path | None = None) -> tuple[Path, Path, Path]:
    """results.csv, curves.csv and probes.csv of the runs under root, into out (default: root)."""
    out = root if out is None else out
    for name, text in zip((RESULTS, CURVES, PROBES), tables(root, runs)):
        rundir.atomic_write(out / name, text.encode())
    return out / RESULTS, out / CURVES, out / PROBES


class Results(NamedTuple):
    runs: object     # one row per run: config and summary
    curves: object   # one row per run and epoch
    probes: object   # one row per run, epoch, layer and probe (runs trained with probes)


def load_results(path, warn: Warn = warn_stderr) -> Results:
    """The results of a study for a notebook: Results(runs, curves).

    `path` is a results directory: its run directories are read afresh (damaged ones skipped
    with a warning), or, when it holds none, the results.csv, curves.csv and probes.csv that
    `normlab report` wrote there (without probes.csv, an empty probes table). Each table is a pandas DataFrame when pandas is installed,
    otherwise a list of dicts (one per row; numbers as int or float, booleans as bool, blank
    cells as None). The columns are those of results.csv, curves.csv and probes.csv (see README).
    """
    root = rundir.confine(path)
    if not root.is_dir():
        raise NormlabError(f"{root} is not a directory; pass a results directory (the --out of "
                           f"normlab reproduce or train)")
    runs = load_runs(root, warn) if any(rundir.list_runs(root)) else []
    if runs:
        texts = tables(root, runs, warn)
    elif (root / RESULTS).is_file() and (root / CURVES).is_file():
        texts = tuple(rundir.read_text(root / name) for name in (RESULTS, CURVES))
        texts += (rundir.read_text(root / PROBES) if (root / PROBES).is_file() else to_csv([], PROBE_KEYS),)
    else:
        raise NormlabError(f"no runs in {root} (no */config.json, nor results.csv and curves.csv); "
                           f"train some with normlab train or normlab reproduce first")
    try:
        import pandas
    except ImportError:
        return Results(*(parse(text) for text in texts))
    return Results(*(pandas.read_csv(io.StringIO(text)) for text in texts))


def parse(text: str) -> list[dict]:
    return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def cell(text: str):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
