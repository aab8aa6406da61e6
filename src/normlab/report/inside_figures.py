"""The figures of "Inside the network" (inside.py): the statistic gap against the batch per
depth, probe trajectories per norm, probes against depth, and the ablations' errors. Lines are
means over seeds (geometric means on log axes); bands and bars 95 % intervals of the mean (of
the log on log axes) where a point has 2+ seeds. Each function returns the figure for the
section to save (Context.figure)."""
from __future__ import annotations

import math

from ..stats import summarize
from .figures import draw_summary, figure, figure_legend, log2_axis
from .labels import label, sort_key, styles
from .probe_data import RunProbes
from .runs import Point

TREND_TITLES = {
    "batch_mean_shift": "batch mean shift (population stds, RMS),\nmean over layers",
    "batch_log_std_ratio": "log(batch std / population std) (RMS),\nmean over layers",
    "last_block_input_rms": "RMS of the last block's input",
    "branch_skip_ratio": "residual branch RMS / skip RMS,\nmean over blocks",
    "grad_norm": "gradient norm per layer,\nmean over layers",
    "feature_effective_rank": "penultimate features:\neffective rank",
    "feature_mean_cosine": "penultimate features:\nmean pairwise cosine",
}
LOG_SCALE = ("last_block_input_rms", "grad_norm")
GAP_PROBES = (("batch_mean_shift", "batch mean shift (population stds, RMS)"),
              ("batch_log_std_ratio", "log(batch std / population std), RMS"))


def mean_band(series: list[list[float]]):
    """Per position, over the seeds that have it: mean, and the 95 % interval (None with one)."""
    n = min(len(s) for s in series)
    sums = [summarize([s[i] for s in series]) for i in range(n)]
    means = [s.mean if s else math.nan for s in sums]
    if len(series) < 2 or not all(s and s.has_interval for s in sums):
        return means, None, None
    return means, [s.low for s in sums], [s.high for s in sums]


def mean_of(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def gap(plt, gaps: dict[str, dict[int, list[RunProbes]]], title: str):
    """For each batch-dependent norm (a row of panels): the batch mean shift and the log std
    ratio at the last epoch against the batch size, one line per depth (viridis, shallow to
    deep), and their mean over layers in black with its interval over seeds."""
    fig = figure(plt, title, len(gaps), 2, extra_width=1.2)
    axes = fig.subplots(len(gaps), 2, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (norm, by_batch) in zip(axes, sorted(gaps.items(), key=lambda kv: sort_key(kv[0]))):
        sizes = sorted(by_batch, reverse=True)
        for ax, (probe, name) in zip(row, GAP_PROBES):
            depths = sorted({d for runs in by_batch.values() for r in runs for d in r.final.get(probe, {})})
            if not depths:
                ax.set_visible(False)
                continue
            for i, depth in enumerate(depths):
                ys = [mean_of([r.final.get(probe, {}).get(depth) for r in by_batch[s]]) for s in sizes]
                ax.plot(sizes, ys, color=cmap(0.9 * i / max(1, len(depths) - 1)), linewidth=1, alpha=0.8)
            overall = [summarize([mean_of(list(r.final[probe].values())) for r in by_batch[s] if r.final.get(probe)])
                       for s in sizes]
            draw_summary(ax, sizes, overall, "mean over layers", {"color": "black", "marker": "o", "linewidth": 2})
            log2_axis(ax, sizes, reverse=True)
            ax.set_xlabel("batch size (images per device)")
            ax.set_ylabel(name)
            ax.set_title(f"{label(norm)}: {name.split(' (')[0].split(',')[0]}")
            bar = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(depths[0], depths[-1]))
            colorbar = fig.colorbar(bar, ax=ax, label="depth (statistics layer, input to output)")
            colorbar.locator = plt.MaxNLocator(integer=True)
            colorbar.update_ticks()
            ax.legend()
    return fig


def trends(plt, by_norm: dict[str, list[RunProbes]], title: str):
    """Each probe summary against the epoch, one line per norm."""
    names = [n for n in TREND_TITLES if any(n in r.trends for runs in by_norm.values() for r in runs)]
    cols = 4
    fig = figure(plt, title, math.ceil(len(names) / cols), cols)
    axes = fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False).flatten()
    style = styles(by_norm)
    for ax, name in zip(axes, names):
        log = name in LOG_SCALE
        for norm in sorted(by_norm, key=sort_key):
            runs = [r for r in by_norm[norm] if name in r.trends]
            if not runs:
                continue
            epochs = runs[0].epochs[:min(len(r.epochs) for r in runs)]
            series = [[math.log(v) if v > 0 else math.nan for v in r.trends[name]] if log else r.trends[name]
                      for r in runs]
            means, low, high = (([math.exp(v) for v in band] if band is not None and log else band)
                                for band in mean_band(series))
            ax.plot(epochs, means, label=label(norm), markevery=max(1, len(epochs) // 8), **style[norm])
            if low is not None:
                ax.fill_between(epochs, low, high, color=style[norm]["color"], alpha=0.1, linewidth=0)
        if log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_title(TREND_TITLES[name], fontsize=8)
        ax.set_xlabel("epoch (0: at initialization)")
    for ax in axes[len(names):]:
        ax.axis("off")
    figure_legend(fig, axes[:len(names)])
    return fig


def depth(plt, by_norm: dict[str, list[RunProbes]], title: str):
    """At the last epoch, against depth: each block's input RMS, its branch / skip RMS ratio,
    and each layer's gradient norm, one line per norm."""
    panels = (("block_input_rms", "RMS of the block's input", "residual block", True),
              ("branch_skip_ratio", "residual branch RMS / skip RMS", "residual block", False),
              ("grad_norm", "gradient norm", "conv layer (classifier last)", True))
    fig = figure(plt, title, 1, 3)
    axes = fig.subplots(1, 3)
    style = styles(by_norm)
    for ax, (probe, name, xlabel, log) in zip(axes, panels):
        for norm in sorted(by_norm, key=sort_key):
            finals = [r.final.get(probe, {}) for r in by_norm[norm] if r.final.get(probe)]
            if not finals:
                continue
            depths = sorted(set.intersection(*(set(f) for f in finals)))
            ax.plot(depths, [mean_of([f[d] for f in finals]) for d in depths], label=label(norm),
                    markevery=max(1, len(depths) // 10), **style[norm])
        if log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
    figure_legend(fig, axes)
    return fig


def ablations(plt, by_batch: dict[int, list[Point]], title: str, xlabel: str):
    """Each norm's test error with its 95 % interval, one panel per batch size: each full norm
    above its ablations, in the order given (top to bottom)."""
    fig = figure(plt, title, 1, len(by_batch), extra_width=0.6)
    fig.set_figheight(0.35 * max(len(p) for p in by_batch.values()) + 1.4)
    axes = fig.subplots(1, len(by_batch), squeeze=False, sharex=True)[0]
    for ax, (batch, points) in zip(axes, sorted(by_batch.items(), reverse=True)):
        points = [p for p in points if p.summary()][::-1]
        style = styles(p.norm for p in points)
        for y, p in enumerate(points):
            s = p.summary()
            err = [[s.mean - s.low], [s.high - s.mean]] if s.has_interval else None
            marker = {k: v for k, v in style[p.norm].items() if k != "linestyle"}
            ax.errorbar([s.mean], [y], xerr=err, capsize=3, linestyle="none", **marker)
        ax.set_yticks(range(len(points)), [label(p.norm) for p in points])
        ax.set_title(f"batch {batch} per device")
        ax.set_xlabel(xlabel)
    return fig
