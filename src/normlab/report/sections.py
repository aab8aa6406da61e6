"""One section of report.md per study (norms, batch-size, groups, zoo, inside): its figures and tables.

SECTIONS maps a study name (as in a preset's `studies`) to its title and section function;
a study without an entry gets `generic`. A new study adds one function and one entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..references import Published
from ..stats import difference, format_difference
from . import figures, published as pub
from .escape import figure as figure_text
from .findings import by_norm_batch, gn_of, sweep
from .inside import inside
from .labels import label, sort_key, sweep_value
from .runs import Point
from .tables import NUMBER, cell, table


@dataclass
class Context:
    plt: object                  # matplotlib.pyplot
    model: str                   # the setup in figure file names: the model, tagged (setups.py)
    points: list[Point]          # this study's points in one setup (runs equal but for norm, batch, seed)
    figures: Path                # the study's folder of figures
    published: list[Published]   # the published numbers to set beside this setup's
    link: str = "figures"        # that folder as report.md links to it
    study: str = ""              # the study's name, in every figure's title
    single: bool = False         # one seed per point throughout the report (said once, at the top)
    number: str = NUMBER         # what a table's number is: 'median of the final 3 epochs'
    written: set = field(default_factory=set)   # the figures written, so that stale ones go
    setup: str = ""              # the setup's title: 'resnet8, 2 devices × N' (default: model)

    @property
    def name(self) -> str:
        """'quick, resnet8, 1 device × N': what a figure's title starts with."""
        return figure_text(", ".join(n for n in (self.study, self.setup or self.model) if n), limit=120)

    def figure(self, fig, name: str, alt: str) -> list[str]:
        """Save a figure and link it; a line saying why there is none yet (mid-study)."""
        if fig is None:
            return [f"(No figure of the {alt} yet: no run of it has finished an epoch.)", ""]
        path = self.figures / name
        figures.save(self.plt, fig, path)
        self.written.add(path)
        return [f"![{alt}]({self.link}/{name})", ""]


def same_and_other(ctx: Context, series):
    cfg = ctx.points[0].cfg
    same = [s for s in series if s[0].same_setting(cfg)]
    return same, [s for s in series if s not in same]


def norms(ctx: Context) -> list[str]:
    md = []
    for size, vg in sorted({(p.cfg.batch_size, p.cfg.virtual_gpus) for p in ctx.points}):
        at = sorted((p for p in ctx.points if (p.cfg.batch_size, p.cfg.virtual_gpus) == (size, vg)),
                    key=lambda p: sort_key(p.norm))
        fig = f"norms_{ctx.model}_b{size}{'x' + str(vg) if vg > 1 else ''}.png"
        notes = pub.notes_for(at)
        headers, extra = pub.columns(ctx.published, [(p.norm, size) for p in at], notes)
        same = [r for r in ctx.published if r.batch_size == size and r.norm in {p.norm for p in at}
                and r.same_setting(at[0].cfg)]
        devices = f"{vg} devices x {size}" if vg > 1 else f"{size}"
        md += ctx.figure(figures.norm_curves(ctx.plt, at, f"{ctx.name}, batch {devices} per device", same),
                         fig, "train and test error per norm")
        rows = [[label(p.norm), cell(p, ctx.single), final_train(p)] + cells for p, cells in zip(at, extra)]
        md += [table(["norm", f"test error (%), {ctx.number}", "train error (%), final epoch"] + headers, rows), ""]
        md += notes.lines() + ([""] if notes.numbers else [])
    return md


def final_train(p: Point) -> str:
    ys = p.curve("train_error")[1]
    return f"{ys[-1]:.2f}" if ys else "-"


def batch_size(ctx: Context) -> list[str]:
    points, model = ctx.points, ctx.model
    same, other = same_and_other(ctx, pub.batch_series(ctx.published))
    md = ctx.figure(figures.batch_sizes(ctx.plt, points, f"{ctx.name}: error against batch size", same, other,
                                        f"test error (%), {ctx.number}"),
                    f"batch_size_{model}.png", "error against batch size")
    md += ctx.figure(figures.batch_curves(ctx.plt, points, f"{ctx.name}: test error per epoch, by batch size"),
                     f"batch_curves_{model}.png", "test error curves per batch size")
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    norms_here = sorted({p.norm for p in points}, key=sort_key)
    cells = by_norm_batch(points)
    rows = [[label(n)] + [cell(cells.get((n, s)), ctx.single) for s in sizes] for n in norms_here]
    gn = gn_of(cells)
    if gn and "bn" in norms_here:
        diffs = []
        for s in sizes:
            a, b = cells.get(("bn", s)), cells.get((gn, s))
            diffs.append(format_difference(difference(a.by_seed, b.by_seed)) if a and b else "-")
        rows.append([f"BN − {label(gn)}"] + diffs)
    notes = pub.notes_for(points)
    rows += pub.batch_rows(ctx.published, norms_here, sizes, notes, gn)
    md += [f"Test error (%), {ctx.number}, by images per device"
           + ("" if ctx.single else "; BN − GN with its 95 % interval where both have 2+ seeds (paired "
                                    "over seeds where both hold the same seeds, else Welch's)")
           + ". Rows named after a paper are published numbers at the same batch sizes.", ""]
    md += [table(["norm"] + [str(s) for s in sizes], rows), ""]
    return md + notes.lines() + ([""] if notes.numbers else [])


def lowest(ctx: Context, scored: dict, name, among: str = "") -> str | None:
    """'lowest test error of G = 1, G = 4, G = 16: G = 16 (9.50 %)' (or of `among`), and what
    the intervals say; None for fewer than two settings (nothing to choose from). Chosen on the
    test-set numbers themselves, it is a description and says so: the findings are the tests."""
    if len(scored) < 2:
        return None
    top = min(scored, key=lambda v: scored[v].summary().mean)
    text = (f"lowest test error of {among or ', '.join(name(v) for v in scored)}: {name(top)} "
            f"({scored[top].summary().mean:.2f} %; chosen on the test set, so a description, not a test)")
    if ctx.single:
        return text
    if any(len(p.finals) < 2 for p in scored.values()):
        return text + "; some have one seed, so no interval tells whether it beats them"
    tied = [name(v) for v, p in scored.items() if v != top
            and (d := difference(p.by_seed, scored[top].by_seed)) and d.has_interval and d.low <= 0]
    return text + (f"; within the 95 % interval of it: {', '.join(tied)}" if tied else
                   "; every other is worse beyond its (uncorrected) 95 % interval")


def groups(ctx: Context) -> list[str]:
    points = [p for p in ctx.points if sweep_value(p.norm, "groups") or sweep_value(p.norm, "per_group")]
    if not points:
        return []
    batch = points[0].cfg.batch_size
    same, other = {}, {}
    for key in ("groups", "per_group"):
        same[key], other[key] = same_and_other(ctx, pub.sweep_series(ctx.published, key, batch))
    md = ctx.figure(figures.groups(ctx.plt, points, f"{ctx.name}: GN group count, batch {batch}", same, other,
                                   f"test error (%), {ctx.number}"),
                    f"groups_{ctx.model}.png", "GN group sweep")
    ordered = [(key, what, p) for key, what in (("groups", "G"), ("per_group", "channels per group"))
               for p in sorted((p for p in points if sweep_value(p.norm, key)), key=lambda p: sweep_value(p.norm, key))]
    notes = pub.notes_for(points)
    headers, extra = pub.columns(ctx.published, [(p.norm, p.cfg.batch_size) for _, _, p in ordered], notes)
    rows = [[f"{what} = {sweep_value(p.norm, key)}", label(p.norm), cell(p, ctx.single)] + cells
            for (key, what, p), cells in zip(ordered, extra)]
    md += [table(["setting", "norm", f"test error (%), {ctx.number}"] + headers, rows), ""]
    md += notes.lines() + ([""] if notes.numbers else [])
    lines = [lowest(ctx, dict(sorted(sweep(points, "groups").items())), lambda v: f"G = {v}"),
             lowest(ctx, dict(sorted(sweep(points, "per_group").items())), lambda v: f"{v} channels per group")]
    return md + [f"- {line}" for line in lines if line] + [""]


def zoo(ctx: Context) -> list[str]:
    """Every normalization against batch size: one line per norm, a table with the lowest error
    per batch size and how the others compare with it (Welch intervals)."""
    points, model = ctx.points, ctx.model
    same, other = same_and_other(ctx, pub.batch_series(ctx.published))
    md = ctx.figure(figures.batch_sizes(ctx.plt, points, f"{ctx.name}: every normalization against batch size",
                                        same, other, f"test error (%), {ctx.number}"),
                    f"zoo_{model}.png", "every normalization against batch size")
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    norms_here = sorted({p.norm for p in points}, key=sort_key)
    cells = by_norm_batch(points)
    rows = [[label(n)] + [cell(cells.get((n, s)), ctx.single) for s in sizes] for n in norms_here]
    lines = []
    for s in sizes:
        scored = {n: cells[(n, s)] for n in norms_here if (n, s) in cells and cells[(n, s)].summary()}
        line = lowest(ctx, scored, label, f"the {len(scored)} norms")
        if line:
            lines.append(f"batch {s}: {line}")
    notes = pub.notes_for(points)
    rows += pub.batch_rows(ctx.published, norms_here, sizes, notes, gn_of(cells))
    md += [f"Test error (%), {ctx.number}, by images per device. Rows named after a paper are published "
           f"numbers.", ""]
    md += [table(["norm"] + [str(s) for s in sizes], rows), ""]
    md += notes.lines() + ([""] if notes.numbers else [])
    return md + [f"- {line}" for line in lines] + [""]


def generic(ctx: Context) -> list[str]:
    """A study this report has no section for: its points, with published numbers."""
    at = sorted(ctx.points, key=lambda p: (sort_key(p.norm), -p.cfg.batch_size, p.cfg.virtual_gpus))
    notes = pub.notes_for(at)
    headers, extra = pub.columns(ctx.published, [(p.norm, p.cfg.batch_size) for p in at], notes)
    rows = [[label(p.norm), p.cfg.batch_size, p.cfg.virtual_gpus, cell(p, ctx.single)] + cells
            for p, cells in zip(at, extra)]
    return [table(["norm", "batch", "virtual GPUs", f"test error (%), {ctx.number}"] + headers, rows), ""] \
        + notes.lines() + ([""] if notes.numbers else [])


# study name -> (section title, function); the order is the report's order
SECTIONS = {
    "norms": ("Error curves per normalization", norms),
    "batch-size": ("Sensitivity to batch size", batch_size),
    "groups": ("Group count", groups),
    "zoo": ("Every normalization (the zoo)", zoo),
    "inside": ("Inside the network", inside),
}
