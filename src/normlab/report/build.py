"""build_report: run directories in, report.md + figures/ + results.csv + curves.csv out."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from .. import references as refs_module
from .. import rundir
from ..errors import NormlabError
from . import findings, sections, tidy
from .escape import markdown
from .figures import pyplot
from .runs import Warn, group_points, load_runs, membership, warn_stderr
from .tables import all_runs_table, setup_lines


def model_order(model: str):
    digits = "".join(c for c in model if c.isdigit())
    return (int(digits) if digits else 0, model)


def load_published(path, warn: Warn) -> list:
    """The published numbers, or none (with one warning) when their table is damaged."""
    try:
        return refs_module.load(path)
    except NormlabError as err:
        warn(f"published numbers left out of the report: {err}; reinstall normlab or fix that file")
        return []


def build_report(root: str | Path, references: str | Path | None = None, warn: Warn = warn_stderr,
                 out: str | Path | None = None) -> Path:
    """Write out/report.md (findings first), out/figures/*.png, out/results.csv and
    out/curves.csv from the run directories under root (out is root unless given: a read-only
    results directory is reported elsewhere). `references` replaces the published numbers
    shipped with normlab (references.yaml). Damaged run directories and a damaged reference
    table are skipped with one warning each (through `warn`)."""
    root = rundir.confine(root)  # nothing below root or out is reached through a link
    out = rundir.confine(out) if out is not None else root
    if not root.is_dir():
        raise NormlabError(f"{root} is not a directory; pass the --out directory of a study or run")
    if (root / "study.json").exists() and rundir.read_json(root / "study.json") is None:
        raise NormlabError(f"{root / 'study.json'} is not valid JSON (edited or damaged by hand?); "
                           f"restore it, or delete it and the report infers the studies from the runs")
    found = rundir.list_runs(root)
    runs = load_runs(root, warn)
    if not runs:
        raise NormlabError(f"no {'readable ' if found else ''}runs in {root} (no */config.json"
                           f"{' that can be read' if found else ''}); train some with normlab train "
                           f"or normlab reproduce first")
    published = load_published(references, warn)
    plt = pyplot()
    figures = out / "figures"
    try:
        rundir.make_dir(figures)
        if not os.access(out, os.W_OK) or not os.access(figures, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as err:
        raise NormlabError(f"cannot write the report into {out} ({err.strerror}); pass --out DIR to "
                           f"write it elsewhere (the run directories are only read)") from None
    for directory in (out, figures):
        rundir.remove_stale_temps(directory)  # left by a report killed while writing
    members = membership(root, runs)
    study = rundir.read_json(root / "study.json") or {}
    models = sorted({r.cfg.model for r in runs}, key=model_order)

    found_claims, untested, body = [], [], []
    for model in models:
        model_runs = [r for r in runs if r.cfg.model == model]
        mine = refs_module.for_model(published, model)

        def points_of(*names):
            chosen = [r for r in model_runs if any(r.id in members.get(n, set()) for n in names)]
            return list(group_points(chosen).values())

        claims, cannot = findings.findings(model, points_of("batch-size", "norms"), points_of("groups"), mine)
        found_claims += claims
        untested += [f"{model}: {u}" for u in cannot]
        body += [f"## {model}", ""]
        names = list(sections.SECTIONS) + [n for n in members if n not in sections.SECTIONS]
        for name in names:
            points = points_of(name)
            if not points:
                continue
            title, section = sections.SECTIONS.get(name, (f"Study '{markdown(name)}'", sections.generic))
            ctx = sections.Context(plt, model, points, figures, mine)
            body += [f"### {title}", ""] + section(ctx)
        body += ["### All runs", "", all_runs_table(model_runs), ""]

    md = [f"# normlab report: {markdown(study.get('name', root.name))}", ""]
    if study.get("description"):
        md += [markdown(study["description"], limit=2000), ""]
    md += findings.section(found_claims, untested)
    md += ["## Setup", ""] + setup_lines(runs) + [
        f"- tidy results: `{tidy.RESULTS}` (one row per run) and `{tidy.CURVES}` (one row per run "
        f"and epoch) beside this file; `normlab.load_results(\"{out}\")` reads them", ""]
    md += body
    path = out / "report.md"
    rundir.atomic_write(path, "\n".join(md).encode())
    tidy.write(root, runs, out)
    return path
