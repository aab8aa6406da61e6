"""The report's PNG figures (matplotlib, Agg). Shaded bands and error bars are 95 % intervals
of the mean over seeds; with one seed a figure says it has none. Published numbers of this
study's setting are drawn on its axes (hollow markers, dotted); those of other settings in a
panel of their own, labelled with their setup, so that levels are never compared across
settings by eye."""
from __future__ import annotations

import io
from pathlib import Path

from .. import rundir
from ..references import Published
from .labels import FAMILIES, OTHER, family, label, sort_key, styles, sweep_value
from .published import short_setting
from .runs import Point

Series = list[tuple[Published, str, list[tuple[int, float]]]]  # (example, name, points)
FINAL = "test error (%), median of final 5 epochs"
# the two GN sweeps of the GN paper's Table 3, drawn in GN's and LN's colours
SWEEPS = (("groups", "G groups", FAMILIES["gn"]), ("per_group", "channels per group", FAMILIES["ln"]))


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def uncertainty_note(points: list[Point]) -> str:
    if any(len(p.finals) >= 2 for p in points):
        return "bands and bars: 95 % CI over seeds"
    return "one seed per point: no intervals"


def save(plt, fig, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()  # written atomically, like every file of a results directory
    fig.savefig(buffer, format="png")
    plt.close(fig)
    rundir.atomic_write(path, buffer.getvalue())


def draw_band(ax, point: Point, column: str, style: dict, name: str, every: int = 10) -> None:
    xs, ys, lows, highs = point.band(column)
    ax.plot(xs, ys, label=name, markevery=max(1, len(xs) // every), **style)
    if lows is not None:
        ax.fill_between(xs, lows, highs, color=style["color"], alpha=0.15, linewidth=0)
    if xs and any(r.state == "diverged" for r in point.runs):
        ax.plot(xs[-1], ys[-1], marker="x", color="red", markersize=10, zorder=5)


def draw_summary(ax, xs: list, summaries: list, name: str, style: dict) -> None:
    """Means with their 95 % interval as error bars (none for single seeds)."""
    means = [s.mean for s in summaries]
    low = [s.mean - s.low if s.has_interval else 0 for s in summaries]
    high = [s.high - s.mean if s.has_interval else 0 for s in summaries]
    bars = [low, high] if any(low) or any(high) else None
    ax.errorbar(xs, means, yerr=bars, label=name, capsize=3, **style)


def draw_published(ax, series: Series, style_of=None) -> None:
    """Published curves, hollow markers on dotted lines, each labelled with its setting."""
    for i, (p, name, pts) in enumerate(series):
        style = dict(style_of(p) if style_of else FAMILIES.get(family(p.norm), OTHER))
        style.pop("name", None)
        # on top of the study's markers, larger, so that a number equal to the study's shows as a ring
        style.update(linestyle=":", markerfacecolor="none", marker="os^Dv<>"[i % 7], markersize=9,
                     markeredgewidth=1.5, zorder=5)
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=f"{short_setting(p)}: {name}", **style)


def log2_axis(ax, ticks, reverse: bool = False) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(ticks), reverse=reverse)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    if reverse:
        ax.invert_xaxis()  # large batch on the left, as in the paper


def other_panel(ax, series: Series, xlabel: str, reverse: bool) -> None:
    draw_published(ax, series)
    log2_axis(ax, [x for _, _, pts in series for x, _ in pts], reverse)
    ax.set_title("published, other settings (trends, not levels)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("published error (%)")
    ax.legend(fontsize=7)


def plot_norm_curves(plt, points: list[Point], title: str, path: Path, same: list[Published]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    style = styles(p.norm for p in points)
    for p in sorted(points, key=lambda p: sort_key(p.norm)):
        for ax, column in zip(axes, ("train_error", "test_error")):
            draw_band(ax, p, column, style[p.norm], label(p.norm))
    for ref in same:  # this study's setting only: the final error a full run reached
        s = style.get(ref.norm, OTHER)
        axes[1].axhline(ref.error, color=s["color"], linestyle=":", linewidth=1,
                        label=f"{short_setting(ref)}: {label(ref.norm)}")
    for ax, name in zip(axes, ("train error (%)", "test error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
    axes[1].legend(fontsize=7)
    save(plt, fig, f"{title} ({uncertainty_note(points)})", path)


def plot_batch_sizes(plt, points: list[Point], title: str, path: Path, same: Series, other: Series) -> None:
    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(9.5 if other else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    by_norm: dict[str, list[Point]] = {}
    for p in points:
        by_norm.setdefault(p.norm, []).append(p)
    style = styles(by_norm)
    for norm in sorted(by_norm, key=sort_key):
        pts = sorted((p for p in by_norm[norm] if p.summary()), key=lambda p: -p.cfg.batch_size)
        if pts:
            draw_summary(ax, [p.cfg.batch_size for p in pts], [p.summary() for p in pts], label(norm), style[norm])
    draw_published(ax, same, lambda p: style.get(p.norm, FAMILIES.get(family(p.norm), OTHER)))
    log2_axis(ax, [p.cfg.batch_size for p in points] + [x for _, _, pts in same for x, _ in pts], reverse=True)
    ax.set_xlabel("batch size (images per device)")
    ax.set_ylabel(FINAL)
    ax.set_title(f"this study ({uncertainty_note(points)})")
    ax.legend(fontsize=7)
    if other:
        other_panel(axes[0][1], other, "batch size (images per device)", reverse=True)
    save(plt, fig, title, path)


def plot_batch_curves(plt, points: list[Point], title: str, path: Path) -> None:
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 3.2), sharey=True, squeeze=False)
    style = styles(p.norm for p in points)
    for ax, size in zip(axes[0], sizes):
        for p in sorted((p for p in points if p.cfg.batch_size == size), key=lambda p: sort_key(p.norm)):
            draw_band(ax, p, "test_error", style[p.norm], label(p.norm), every=8)
        ax.set_title(f"batch {size}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("test error (%)")
    axes[0][-1].legend(fontsize=7)
    save(plt, fig, f"{title} ({uncertainty_note(points)})", path)


def plot_groups(plt, points: list[Point], title: str, path: Path, same: dict[str, Series],
                other: dict[str, Series]) -> None:
    """Curves per group count; final error against G and against channels per group."""
    by_groups = sorted((p for p in points if sweep_value(p.norm, "groups")),
                       key=lambda p: -sweep_value(p.norm, "groups"))
    has_other = any(other.values())
    fig, axes = plt.subplots(1, 3 if has_other else 2, figsize=(13.5 if has_other else 9, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, p in enumerate(by_groups):
        style = {"color": cmap(i / max(1, len(by_groups) - 1) * 0.9), "marker": "osD^vP*X"[i % 8]}
        draw_band(axes[0], p, "test_error", style, f"G={sweep_value(p.norm, 'groups')}", every=8)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(title="groups", fontsize=7)
    ticks = []
    for key, name, style in SWEEPS:
        pts = sorted((p for p in points if sweep_value(p.norm, key) and p.summary()),
                     key=lambda p: sweep_value(p.norm, key))
        style = {k: v for k, v in style.items() if k != "name"}
        if pts:
            xs = [sweep_value(p.norm, key) for p in pts]
            ticks += xs
            draw_summary(axes[1], xs, [p.summary() for p in pts], name, style)
        for item in same.get(key, []):
            ticks += [x for x, _ in item[2]]
            draw_published(axes[1], [item], lambda _, style=style: style)
    log2_axis(axes[1], ticks or [1])
    axes[1].set_xlabel("G, or channels per group")
    axes[1].set_ylabel(FINAL)
    axes[1].set_title(f"this study ({uncertainty_note(points)})")
    axes[1].legend(fontsize=7)
    if has_other:
        for key, _, style in SWEEPS:
            draw_published(axes[2], other.get(key, []), lambda _, style=style: style)
        log2_axis(axes[2], [x for key in other for _, _, pts in other[key] for x, _ in pts])
        axes[2].set_title("published, other settings (trends, not levels)")
        axes[2].set_xlabel("G, or channels per group")
        axes[2].set_ylabel("published error (%)")
        axes[2].legend(fontsize=7)
    save(plt, fig, title, path)
