"""One section of report.md per study (norms, batch-size, groups, zoo): its figures and tables.

SECTIONS maps a study name (as in a preset's `studies`) to its title and section function;
a study without an entry gets `generic`. A new study adds one function and one entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..references import Published
from ..stats import difference, format_difference
from . import figures, published as pub
from .findings import by_norm_batch, gn_of, sweep
from .labels import label, sort_key, sweep_value
from .runs import Point, seeds_note
from .tables import NUMBER, all_single, cell, table


@dataclass
class Context:
    plt: object                  # matplotlib.pyplot
    model: str
    points: list[Point]          # this study's points for this model
    figures: Path
    published: list[Published]   # the published numbers to set beside this model's


def note(points: list[Point]) -> list[str]:
    text = seeds_note(points)
    return [text, ""] if text else []


def same_and_other(ctx: Context, series):
    cfg = ctx.points[0].cfg
    same = [s for s in series if s[0].same_setting(cfg.model, cfg.data, cfg.virtual_gpus)]
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
                and r.same_setting(ctx.model, at[0].cfg.data, vg)]
        figures.plot_norm_curves(ctx.plt, at, f"{ctx.model}, batch {size} per device", ctx.figures / fig, same)
        single = all_single(at)
        rows = [[label(p.norm), cell(p, single), final_train(p)] + cells for p, cells in zip(at, extra)]
        md += [f"![train and test error per norm](figures/{fig})", ""] + note(at)
        md += [table(["norm", f"test error (%), {NUMBER}", "train error (%), final epoch"] + headers, rows), ""]
        md += notes.lines() + ([""] if notes.numbers else [])
    return md


def final_train(p: Point) -> str:
    ys = p.curve("train_error")[1]
    return f"{ys[-1]:.2f}" if ys else "-"


def batch_size(ctx: Context) -> list[str]:
    points, model = ctx.points, ctx.model
    same, other = same_and_other(ctx, pub.batch_series(ctx.published))
    figures.plot_batch_sizes(ctx.plt, points, f"{model}: error vs batch size", ctx.figures / f"batch_size_{model}.png",
                             same, other)
    figures.plot_batch_curves(ctx.plt, points, f"{model}: test error curves per batch size",
                              ctx.figures / f"batch_curves_{model}.png")
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    norms_here = sorted({p.norm for p in points}, key=sort_key)
    cells = by_norm_batch(points)
    single = all_single(points)
    rows = [[label(n)] + [cell(cells.get((n, s)), single) for s in sizes] for n in norms_here]
    gn = gn_of(cells)
    if gn and "bn" in norms_here:
        diffs = []
        for s in sizes:
            a, b = cells.get(("bn", s)), cells.get((gn, s))
            diffs.append(format_difference(difference(a.finals, b.finals)) if a and b else "-")
        rows.append([f"BN − {label(gn)}"] + diffs)
    notes = pub.notes_for(points)
    rows += pub.batch_rows(ctx.published, norms_here, sizes, notes, gn)
    md = [f"![error vs batch size](figures/batch_size_{model}.png)", "",
          f"![BN and GN curves per batch size](figures/batch_curves_{model}.png)", "",
          f"Test error (%), {NUMBER}, by images per device; BN − GN is positive where BN's error is "
          f"higher, with Welch's 95 % interval in brackets where both have 2+ seeds. Rows named "
          f"after a paper are published numbers at the same batch sizes.", ""] + note(points)
    md += [table(["norm"] + [str(s) for s in sizes], rows), ""]
    return md + notes.lines() + ([""] if notes.numbers else [])


def groups(ctx: Context) -> list[str]:
    points = [p for p in ctx.points if sweep_value(p.norm, "groups") or sweep_value(p.norm, "per_group")]
    if not points:
        return []
    batch = points[0].cfg.batch_size
    same, other = {}, {}
    for key in ("groups", "per_group"):
        same[key], other[key] = same_and_other(ctx, pub.sweep_series(ctx.published, key, batch))
    figures.plot_groups(ctx.plt, points, f"{ctx.model}: GN group count", ctx.figures / f"groups_{ctx.model}.png",
                        same, other)
    ordered = [(key, what, p) for key, what in (("groups", "G"), ("per_group", "channels per group"))
               for p in sorted((p for p in points if sweep_value(p.norm, key)), key=lambda p: sweep_value(p.norm, key))]
    notes = pub.notes_for(points)
    headers, extra = pub.columns(ctx.published, [(p.norm, p.cfg.batch_size) for _, _, p in ordered], notes)
    single = all_single(points)
    rows = [[f"{what} = {sweep_value(p.norm, key)}", label(p.norm), cell(p, single)] + cells
            for (key, what, p), cells in zip(ordered, extra)]
    best = []
    for key, what in (("groups", "G"), ("per_group", "channels per group")):
        mine = sweep(points, key)
        if mine:
            top = min(mine, key=lambda v: mine[v].summary().mean)
            tied = [v for v, p in mine.items() if v != top
                    and (d := difference(p.finals, mine[top].finals)) and d.has_interval and d.low <= 0]
            unsure = any(len(p.finals) < 2 for p in mine.values())
            best.append(f"best {what}: {top} ({mine[top].summary().mean:.2f}% test error)"
                        + ("; one seed, so no interval tells whether it beats the others" if unsure else
                           f"; within the 95 % interval of it: {', '.join(map(str, sorted(tied)))}" if tied else
                           "; every other setting is worse beyond its 95 % interval"))
    md = [f"![GN group sweep](figures/groups_{ctx.model}.png)", ""] + note(points)
    md += [table(["setting", "norm", f"test error (%), {NUMBER}"] + headers, rows), ""]
    md += notes.lines() + ([""] if notes.numbers else [])
    return md + [f"- {b}" for b in best] + [""]


def zoo(ctx: Context) -> list[str]:
    """Every normalization against batch size: one line per norm, a table with the best per
    batch size and how the others compare with it (Welch intervals)."""
    points, model = ctx.points, ctx.model
    same, other = same_and_other(ctx, pub.batch_series(ctx.published))
    fig = f"zoo_{model}.png"
    figures.plot_batch_sizes(ctx.plt, points, f"{model}: every normalization against batch size",
                             ctx.figures / fig, same, other)
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    norms_here = sorted({p.norm for p in points}, key=sort_key)
    cells = by_norm_batch(points)
    single = all_single(points)
    rows = [[label(n)] + [cell(cells.get((n, s)), single) for s in sizes] for n in norms_here]
    best = []
    for s in sizes:
        scored = {n: cells[(n, s)] for n in norms_here if (n, s) in cells and cells[(n, s)].summary()}
        if not scored:
            continue
        top = min(scored, key=lambda n: scored[n].summary().mean)
        tied = [label(n) for n, p in scored.items() if n != top
                and (d := difference(p.finals, scored[top].finals)) and d.has_interval and d.low <= 0]
        best.append(f"batch {s}: lowest error {label(top)} ({scored[top].summary().mean:.2f}%)"
                    + ("; one seed, so no interval says whether it beats the others" if single else
                       f"; within the 95 % interval of it: {', '.join(tied)}" if tied else
                       "; every other norm is worse beyond its 95 % interval"))
    notes = pub.notes_for(points)
    rows += pub.batch_rows(ctx.published, norms_here, sizes, notes, gn_of(cells))
    md = [f"![every normalization against batch size](figures/{fig})", "",
          f"Test error (%), {NUMBER}, by images per device. Rows named after a paper are published "
          f"numbers.", ""] + note(points)
    md += [table(["norm"] + [str(s) for s in sizes], rows), ""]
    md += notes.lines() + ([""] if notes.numbers else [])
    return md + [f"- {b}" for b in best] + [""]


def generic(ctx: Context) -> list[str]:
    """A study this report has no section for: its points, with published numbers."""
    at = sorted(ctx.points, key=lambda p: (sort_key(p.norm), -p.cfg.batch_size, p.cfg.virtual_gpus))
    notes = pub.notes_for(at)
    headers, extra = pub.columns(ctx.published, [(p.norm, p.cfg.batch_size) for p in at], notes)
    single = all_single(at)
    rows = [[label(p.norm), p.cfg.batch_size, p.cfg.virtual_gpus, cell(p, single)] + cells for p, cells in zip(at, extra)]
    return note(at) + [table(["norm", "batch", "virtual GPUs", f"test error (%), {NUMBER}"] + headers, rows), ""] \
        + notes.lines() + ([""] if notes.numbers else [])


# study name -> (section title, function); the order is the report's order
SECTIONS = {
    "norms": ("Error curves per normalization", norms),
    "batch-size": ("Sensitivity to batch size", batch_size),
    "groups": ("Group count", groups),
    "zoo": ("Every normalization (the zoo)", zoo),
}
