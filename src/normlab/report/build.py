"""build_report: run directories in, report.md + figures/ + results.csv + curves.csv out."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from .. import references as refs_module
from .. import rundir
from ..errors import NormlabError
from ..records import read_records
from . import findings, sections, setups, tidy
from .escape import markdown
from .figures import pyplot
from .runs import Warn, group_points, load_runs, warn_stderr
from .studies import Study, studies_of
from .tables import SIGNS, all_runs_table, number, seeds_notice, setup_lines


def load_published(path, warn: Warn) -> list:
    """The published numbers, or none (with one warning) when their table is damaged."""
    try:
        return refs_module.load(path)
    except NormlabError as err:
        warn(f"published numbers left out of the report: {err}; reinstall normlab or fix that file")
        return []


CLAIM_PARTS = {"norms", "batch-size", "groups"}  # the parts of a study that the findings draw on


def build_report(root: str | Path, references: str | Path | None = None, warn: Warn = warn_stderr,
                 out: str | Path | None = None, flat_margin: float = findings.FLAT_MARGIN) -> Path:
    """Write out/report.md (findings first, then a section per study and, within it, per setup:
    setups.py), out/figures/<study>/*.png, out/results.csv and out/curves.csv from the run
    directories under root (out is root unless given: a read-only results directory is reported
    elsewhere). `references` replaces the published numbers shipped with normlab
    (references.yaml); `flat_margin` is the band of the "flat" claim, in points. Damaged run directories and a
    damaged reference table are skipped with one warning each (through `warn`); figures that
    this report did not draw (left by an earlier one) are removed."""
    root = rundir.confine(root)  # nothing below root or out is reached through a link
    out = rundir.confine(out) if out is not None else root
    if not root.is_dir():
        raise NormlabError(f"{root} is not a directory; pass the --out directory of a study or run")
    records = read_records(root)  # a damaged record is refused before anything is written
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
    for directory in (out, figures, *(p for p in figures.iterdir() if p.is_dir() and not p.is_symlink())):
        rundir.remove_stale_temps(directory)  # left by a report killed while writing
    studies = studies_of(root, runs, records)
    single = all(len(p.finals) < 2 for p in group_points(runs).values())
    found_claims, untested, body, written = [], [], [], set()
    for study in studies:
        claims, cannot, lines = study_section(study, published, plt, figures, single, written, len(studies) > 1,
                                              flat_margin)
        found_claims += claims
        untested += cannot
        body += lines

    only = studies[0] if len(studies) == 1 and records else None
    md = [f"# normlab report: {markdown(only.name if only else root.resolve().name)}", ""]
    if only and only.description:
        md += [markdown(only.description, limit=2000, block=True), ""]
    if len(studies) > 1:
        md += [f"This directory holds {len(studies)} studies, each with its own section below: "
               + "; ".join(f"{markdown(s.name)} ({len(s.runs)} runs{', ' + s.progress() if s.progress() else ''})"
                           for s in studies) + ".", ""]
    md += seeds_notice(list(group_points(runs).values())) + ["", SIGNS, ""]
    md += [f"Tidy results: `{tidy.RESULTS}` (one row per run), `{tidy.CURVES}` (one row per run and "
           f"epoch) and `{tidy.PROBES}` (one row per run, epoch, layer and probe, for runs trained with "
           f"probes) beside this file; `normlab.load_results(\"{out}\")` reads them.", ""]
    md += findings.section(found_claims, untested, flat_margin)
    md += body
    path = out / "report.md"
    rundir.atomic_write(path, "\n".join(md).encode())
    remove_stale_figures(figures, written)
    tidy.write(root, runs, out)
    return path


def study_section(study: Study, published: list, plt, figures: Path, single: bool, written: set,
                  several: bool, flat_margin: float = findings.FLAT_MARGIN) -> tuple[list, list[str], list[str]]:
    """One study's findings, the claims it cannot test, and its section of report.md: a part per
    setup (runs equal but for norm, batch and seed; never compared with each other's)."""
    progress = study.progress()
    md = [f"## Study: {markdown(study.name)}", ""]
    if study.description and several:
        md += [markdown(study.description, limit=2000, block=True), ""]
    if study.inferred and several:
        md += ["Runs that no study record names (trained by `normlab train`, or left by an earlier "
               "version of a study); their parts are inferred from their configs.", ""]
    if progress:
        md += [f"**{progress[0].upper() + progress[1:]}**: the numbers below are those of the finished "
               f"runs; figures show the epochs done so far.", ""]
    if not study.runs:
        return [], [], md + ["No run of this study has started yet.", ""]
    md += ["Setup:", ""] + setup_lines(study.runs) + [""]
    claims, untested = [], []
    for setup in setups.partition(study.runs):
        model_runs, model = setup.runs, setup.slug
        mine = refs_module.for_model(published, setup.model)
        name = f"{setup.title}, {study.name}" if several else setup.title

        def points_of(*parts):
            chosen = [r for r in model_runs if any(r.id in study.members.get(n, set()) for n in parts)]
            return list(group_points(chosen).values())

        if CLAIM_PARTS & set(study.members):  # a study of other parts (the zoo) tests none of the claims
            found, cannot = findings.findings(name, setup.cfg, points_of("batch-size", "norms"), points_of("groups"),
                                              mine, flat_margin)
            claims += found
            untested += [f"{name}: {u}" for u in cannot]
            if cannot and progress:  # said once per study, after its claims
                untested.append(f"{name}: the study is {progress}; more claims may be tested when it completes")
        md += [f"### {setup.title}", ""]
        folder = figures / study.folder
        rundir.make_dir(folder)  # never a link
        parts = list(sections.SECTIONS) + [n for n in study.members if n not in sections.SECTIONS]
        for part in parts:
            points = points_of(part)
            if not points:
                continue
            title, section = sections.SECTIONS.get(part, (f"Part '{markdown(part)}'", sections.generic))
            ctx = sections.Context(plt, model, points, folder, mine, link=f"figures/{study.folder}",
                                   study=study.name, single=single, number=number(model_runs), written=written,
                                   setup=setup.title)
            md += [f"#### {title}", ""] + section(ctx)
        md += ["#### All runs", "", all_runs_table(model_runs), ""]
    return claims, untested, md


def remove_stale_figures(figures: Path, written: set) -> None:
    """PNGs under figures/ that this report did not draw: an earlier report's, now stale."""
    for png in figures.rglob("*.png"):
        if png not in written:
            png.unlink(missing_ok=True)
    for folder in figures.iterdir():
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
