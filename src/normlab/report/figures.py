"""The report's PNG figures (matplotlib, Agg). Each function returns a figure (or None when
there is nothing to draw yet, mid-study) and `save` writes it; tests check the artists.

Every panel has a title; legends sit outside the data, at the right; every norm has its own
colour and marker (labels.styles); epochs are whole numbers. Shaded bands and error bars are
95 % intervals of the mean over seeds (none with one seed). Published numbers of this study's
setting are drawn on its axes (hollow markers, dotted), those of other settings in panels of
their own, so that levels are never compared across settings by eye; published numbers that
are not a series (fewer than three: a source's best and worst, say) are markers only."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from .. import rundir
from ..references import Published
from .labels import FAMILIES, OTHER, family, label, sort_key, styles, sweep_value
from .published import short_setting
from .runs import Point

Series = list[tuple[Published, str, list[tuple[int, float]]]]  # (example, name, points)
# the two GN sweeps of the GN paper's Table 3: key, axis label, title, marker; x runs from LN
# (G = 1; all channels in one group) on the left to IN (G = C; 1 channel per group) on the right
SWEEPS = (("groups", "groups per layer G (1 = LN)", "against the group count G", "s"),
          ("per_group", "channels per group (1 = IN)", "against channels per group", "D"))
SWEEP_COLOR = FAMILIES["gn"]["color"]
PANEL = (4.0, 3.0)  # inches per panel, legend aside


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                         "legend.fontsize": 7, "axes.titlesize": 9})
    return plt


def save(plt, fig, path: Path) -> None:
    """Write the figure to path atomically, like every file of a results directory."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a name from a file in a script the font lacks: drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buffer, format="png")
    plt.close(fig)
    rundir.atomic_write(path, buffer.getvalue())


def figure(plt, title: str, rows: int, cols: int, extra_width: float = 1.8):
    """A figure of panels sharing one legend, which goes at the right (figure_legend)."""
    fig = plt.figure(figsize=(PANEL[0] * cols + extra_width, PANEL[1] * rows + 0.5), layout="constrained")
    fig.suptitle(title)
    return fig


def figure_legend(fig, axes) -> None:
    """One legend for panels that show the same series, outside them at the right."""
    entries = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(name, handle)
    if entries:  # centred at the right, clear of the title; the figure grows to hold it
        fig.set_figheight(max(fig.get_figheight(), 0.2 * len(entries) + 1.0))
        fig.legend(list(entries.values()), list(entries), loc="outside right center")


def panel_grid(plt, title: str, cells: list[list[bool]], legend_rows: list[int]):
    """A figure of panels with a legend each, below it: a grid of subfigures, one per cell that
    is True (the others stay blank, so that panels along one x axis stand in one column).
    legend_rows: per grid row, the most legend lines a panel of it has. Returns the figure and
    the subfigures by (row, col)."""
    rows, cols = len(cells), len(cells[0])
    heights = [PANEL[1] + 0.16 * n for n in legend_rows]
    fig = plt.figure(figsize=(PANEL[0] * cols, sum(heights) + 0.4), layout="constrained")
    fig.suptitle(title)
    subs = fig.subfigures(rows, cols, squeeze=False, height_ratios=heights)
    return fig, {(r, c): subs[r][c] for r in range(rows) for c in range(cols) if cells[r][c]}


def legend_below(sub, ax) -> None:
    """The panel's legend under it, inside its subfigure."""
    handles, names = ax.get_legend_handles_labels()
    if handles:
        sub.legend(handles, names, loc="outside lower center", ncol=2 if len(names) > 4 else 1)


def legend_lines(count: int) -> int:
    return count if count <= 4 else -(-count // 2)


def uncertainty_note(points: list[Point]) -> str:
    """What the bands mean, where there are any (one seed: nothing to say here)."""
    return " (bands and bars: 95 % CI over seeds)" if any(len(p.finals) >= 2 for p in points) else ""


def epoch_axis(ax, last: int) -> None:
    """Whole epochs only: every epoch ticked up to 12, else MaxNLocator's whole numbers."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    if last <= 12:
        ax.set_xticks(range(1, last + 1))
        ax.set_xlim(0.6, last + 0.4)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def draw_band(ax, point: Point, column: str, style: dict, name: str, every: int = 10) -> int:
    """A point's curve (mean over seeds) with its 95 % band; returns its last epoch (0: none)."""
    xs, ys, lows, highs = point.band(column)
    if not xs:
        return 0
    ax.plot(xs, ys, label=name, markevery=max(1, len(xs) // every), **style)
    if lows is not None:
        ax.fill_between(xs, lows, highs, color=style["color"], alpha=0.15, linewidth=0)
    if any(r.state == "diverged" for r in point.runs):
        ax.plot(xs[-1], ys[-1], marker="x", color="red", markersize=10, zorder=5)
    return xs[-1]


def draw_summary(ax, xs: list, summaries: list, name: str, style: dict) -> None:
    """Means with their 95 % interval as error bars (none for single seeds); a line joins them
    only when there are several (a series)."""
    means = [s.mean for s in summaries]
    low = [s.mean - s.low if s.has_interval else 0 for s in summaries]
    high = [s.high - s.mean if s.has_interval else 0 for s in summaries]
    bars = [low, high] if any(low) or any(high) else None
    ax.errorbar(xs, means, yerr=bars, label=name, capsize=3, **style)


def draw_published(ax, series: Series, style_of=None, names: bool = True) -> None:
    """Published numbers, hollow markers, each labelled with its setting (and, with `names`, the
    series' name: 'BN'); dotted lines join them only where the source gives a series (three or
    more numbers)."""
    for i, (p, name, pts) in enumerate(series):
        style = dict(style_of(p) if style_of else FAMILIES.get(family(p.norm), OTHER))
        style.update(linestyle=":" if len(pts) >= 3 else "none", markerfacecolor="none",
                     marker="os^Dv<>"[i % 7], markersize=9, markeredgewidth=1.5, zorder=5)
        # on top of the study's markers, larger, so that a number equal to the study's shows as a ring
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=short_setting(p) + (f": {name}" if names else ""), **style)


def log2_axis(ax, ticks, reverse: bool = False) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(ticks))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    if reverse:
        ax.invert_xaxis()  # large batch on the left, as in the paper


def norm_curves(plt, points: list[Point], title: str, same: list[Published]):
    """Train and test error per epoch, one line per norm; None before any epoch has finished."""
    drawn = [p for p in sorted(points, key=lambda p: sort_key(p.norm)) if p.band("test_error")[0]]
    if not drawn:
        return None
    fig = figure(plt, title + uncertainty_note(drawn), 1, 2)
    axes = fig.subplots(1, 2, sharey=True)
    style = styles(p.norm for p in drawn)
    last = max(draw_band(ax, p, column, style[p.norm], label(p.norm))
               for p in drawn for ax, column in zip(axes, ("train_error", "test_error")))
    for ref in same:  # this study's setting only: the final error a full run reached
        s = style.get(ref.norm, OTHER)
        axes[1].axhline(ref.error, color=s["color"], linestyle=":", linewidth=1,
                        label=f"{short_setting(ref)}: {label(ref.norm)}")
    for ax, name in zip(axes, ("train error (%)", "test error (%)")):
        epoch_axis(ax, last)
        ax.set_ylabel(name)
        ax.set_title(name.replace(" (%)", " per epoch"))
    figure_legend(fig, axes)
    return fig


def batch_sizes(plt, points: list[Point], title: str, same: Series, other: Series, ylabel: str):
    """Final error against batch size, one line per norm (published numbers of other settings
    in a panel of their own); None before any run has finished."""
    by_norm: dict[str, list[Point]] = {}
    for p in points:
        if p.summary():
            by_norm.setdefault(p.norm, []).append(p)
    if not by_norm:
        return None
    if other:
        fig, subs = panel_grid(plt, title, [[True, True]], [legend_lines(max(len(by_norm) + len(same), len(other)))])
        ax = subs[0, 0].subplots()
    else:
        fig = figure(plt, title, 1, 1, extra_width=2.2)
        ax = fig.subplots()
    style = styles(by_norm)
    for norm in sorted(by_norm, key=sort_key):
        pts = sorted(by_norm[norm], key=lambda p: -p.cfg.batch_size)
        draw_summary(ax, [p.cfg.batch_size for p in pts], [p.summary() for p in pts], label(norm), style[norm])
    draw_published(ax, same, lambda p: style.get(p.norm, FAMILIES.get(family(p.norm), OTHER)))
    log2_axis(ax, [p.cfg.batch_size for ps in by_norm.values() for p in ps] + [x for _, _, pts in same for x, _ in pts],
              reverse=True)
    ax.set_xlabel("batch size (images per device)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"this study{uncertainty_note(points)}")
    if other:
        legend_below(subs[0, 0], ax)
        other_panel(subs[0, 1], other, "batch size (images per device)", reverse=True)
    else:
        figure_legend(fig, [ax])
    return fig


def other_panel(sub, series: Series, xlabel: str, reverse: bool = False, style_of=None, names: bool = True) -> None:
    """Published numbers of other settings than the study's, in a panel of their own."""
    ax = sub.subplots()
    draw_published(ax, series, style_of, names)
    log2_axis(ax, [x for _, _, pts in series for x, _ in pts], reverse)
    ax.set_title("published, other settings (trends, not levels)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("published error (%)")
    legend_below(sub, ax)


def batch_curves(plt, points: list[Point], title: str):
    """Test error per epoch, a panel per batch size; None before any epoch has finished."""
    drawn = [p for p in points if p.band("test_error")[0]]
    sizes = sorted({p.cfg.batch_size for p in drawn}, reverse=True)
    if not sizes:
        return None
    fig = figure(plt, title + uncertainty_note(drawn), 1, len(sizes))
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    style = styles(p.norm for p in drawn)
    for ax, size in zip(axes, sizes):
        at = sorted((p for p in drawn if p.cfg.batch_size == size), key=lambda p: sort_key(p.norm))
        epoch_axis(ax, max(draw_band(ax, p, "test_error", style[p.norm], label(p.norm), every=8) for p in at))
        ax.set_title(f"batch {size} per device")
    axes[0].set_ylabel("test error (%)")
    figure_legend(fig, axes)
    return fig


def group_curves(sub, points: list[Point], key: str, cmap) -> None:
    """Test error per epoch along one sweep, coloured from LN-like to IN-like."""
    ax = sub.subplots()
    order = sorted(points, key=lambda p: sweep_value(p.norm, key) * (1 if key == "groups" else -1))
    last = 0
    for i, p in enumerate(order):
        style = {"color": cmap(i / max(1, len(order) - 1) * 0.9), "marker": "osD^vP*Xph"[i % 10]}
        last = max(last, draw_band(ax, p, "test_error", style, label(p.norm), every=8))
    epoch_axis(ax, last)
    ax.set_ylabel("test error (%)")
    ax.set_title("test error per epoch, " + ("by G" if key == "groups" else "by channels per group"))
    legend_below(sub, ax)


def final_panel(sub, points: list[Point], same: Series, key: str, ylabel: str) -> None:
    """Final error along one sweep (this study's, and published numbers of its setting)."""
    ax = sub.subplots()
    _, xlabel, what, marker = next(s for s in SWEEPS if s[0] == key)
    style = {"color": SWEEP_COLOR, "marker": marker, "linestyle": "-"}
    ticks = [sweep_value(p.norm, key) for p in points]
    if points:
        draw_summary(ax, ticks, [p.summary() for p in points], "this study", style)
    draw_published(ax, same, lambda _: style, names=False)
    log2_axis(ax, ticks + [x for _, _, pts in same for x, _ in pts], reverse=key == "per_group")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"final error {what}")
    legend_below(sub, ax)


def groups(plt, points: list[Point], title: str, same: dict[str, Series], other: dict[str, Series], ylabel: str):
    """The GN sweeps: curves along a sweep, final error against G and against channels per group
    (separate axes: they run in opposite directions; both from LN-like on the left to IN-like on
    the right), and published numbers of other settings for the sweeps this study runs, in
    panels of their own. None before any epoch has finished."""
    with_rows = [p for p in points if p.band("test_error")[0]]
    finished = {key: sorted((p for p in points if sweep_value(p.norm, key) and p.summary()),
                            key=lambda p: sweep_value(p.norm, key)) for key, *_ in SWEEPS}
    curve_key = next((key for key, *_ in SWEEPS if any(sweep_value(p.norm, key) for p in with_rows)), None)
    curves = [p for p in with_rows if curve_key and sweep_value(p.norm, curve_key)]
    runs = [key for key, *_ in SWEEPS if any(sweep_value(p.norm, key) for p in points) or same.get(key)]
    finals = [key for key in runs if finished[key] or same.get(key)]
    others = [key for key in runs if other.get(key)]
    if not curves and not finals:
        return None
    # one row when it fits; else this study's panels above, other settings' under the same axes
    top = ([("curves", curve_key)] if curves else []) + [("final", key) for key in finals]
    bottom = [("other", key) for key in others]
    if len(top) + len(bottom) <= 3:
        grid = [top + bottom]
    else:
        columns = ([None] if curves else []) + [key for key in runs if key in finals or key in others]
        grid = [[("curves", curve_key) if c is None else ("final", c) if c in finals else None for c in columns],
                [("other", c) if c in others else None for c in columns]]
    lines = [max([legend_lines(len(curves)) if kind == "curves" else
                  1 + len(same.get(key, [])) if kind == "final" else len(other[key])
                  for kind, key in filter(None, row)]) for row in grid]
    fig, subs = panel_grid(plt, title + uncertainty_note(points), [[bool(c) for c in row] for row in grid], lines)
    for (r, c), sub in subs.items():
        kind, key = grid[r][c]
        xlabel, marker = next((s[1], s[3]) for s in SWEEPS if s[0] == key)
        if kind == "curves":
            group_curves(sub, curves, key, plt.get_cmap("viridis"))
        elif kind == "final":
            final_panel(sub, finished[key], same.get(key, []), key, ylabel)
        else:
            style = {"color": SWEEP_COLOR, "marker": marker}
            other_panel(sub, other[key], xlabel, reverse=key == "per_group", style_of=lambda _, s=style: s,
                        names=False)
    return fig
