"""The report section "Inside the network" (study `inside`, presets why and why-quick): why a
norm helps, from the probes each run recorded (normlab/probes.py, read by probe_data.py).

It shows BN's train/test statistic gap against the batch per depth, the probes' trajectories
per norm and their profile over depth, the ablations' errors beside the full norms, and one
finding with a verdict: "BN's small-batch penalty follows its train/test statistic gap", the
slope of the test error on the gap across BN's runs at every batch size (ordinary least
squares, Student t interval), with the share of BN's small-batch penalty that testing with
batch statistics, as training normalizes, instead of population statistics takes back. Every
number of the finding is the run's last epoch's (the gap, and the test errors that the probes
measured with population and with batch statistics on the same test images), so that they
describe one network; the report's other tables give the median of the final 5 epochs.
"""
from __future__ import annotations

import math
import statistics

from .. import norms
from ..errors import NormlabError
from ..stats import Summary, difference, format_difference, format_summary, summarize, t_quantile
from . import inside_figures as figs
from .findings import sign_verdict
from .labels import label, sort_key, split
from .probe_data import RunProbes, load
from .runs import Point, warn_stderr
from .tables import cell, table

CLAIM = "BN's small-batch penalty follows its train/test statistic gap (across batch sizes)"
RULE = ("The slope of the test error on the statistic gap at the last epoch over BN's runs (every batch "
        "size and seed; ordinary least squares) agrees when its 95 % interval lies wholly above 0, "
        "disagrees when wholly below, and is inconclusive when it contains 0 or with fewer than "
        "3 runs at 2 or more batch sizes.")


def is_batch_dependent(norm: str) -> bool:
    try:
        return norms.parse_norm(split(norm)[0]).batch_dependent
    except NormlabError:  # a spec this version cannot parse
        return False


def full_norm(norm: str) -> str | None:
    """The norm an ablation ablates ('gn:16:mean-only' -> 'gn:16'); None for full norms and none."""
    base, precise = split(norm)
    spec = norms.parse_norm(base)
    if not spec.mode or precise:
        return None
    return spec.norm_canonical() + ("+ws" if spec.ws else "")


def is_ablation(norm: str) -> bool:
    """A mean-only or scale-only norm, or no norm at all."""
    return bool(full_norm(norm)) or split(norm)[0] in ("none", "none:skipinit")


def ablation_order(norm: str) -> tuple:
    """Each full norm followed by its mean-only and scale-only forms; no norm and SkipInit last."""
    base = split(norm)[0]
    if base in ("none", "none:skipinit"):
        return (1, base)
    full = full_norm(norm)
    mode = norms.parse_norm(base).mode
    return (0, sort_key(full or norm), (None, "mean-only", "scale-only").index(mode))


def slope(xs: list[float], ys: list[float]) -> tuple[Summary | None, float]:
    """The least-squares slope of ys on xs with its 95 % t interval (n - 2 degrees of
    freedom), and Pearson's r; no interval with fewer than 3 points."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None, math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy else math.nan
    if n < 3:
        return Summary(n, b, math.nan), r
    se = math.sqrt(max(syy - b * sxy, 0.0) / (n - 2) / sxx)
    half = t_quantile(0.95, n - 2) * se
    return Summary(n, b, se, b - half, b + half), r


def gap_finding(bn: dict[int, Point], probes: dict[str, RunProbes]) -> tuple[list, list[str]]:
    """The finding's table row (claim, this study, verdict) and the lines on the penalty's share."""
    pairs = [(probes[r.id].gap(), probes[r.id].final_test_error("population"), b) for b, p in bn.items()
             for r in p.runs if r.final is not None and r.id in probes and probes[r.id].gap() is not None
             and probes[r.id].final_test_error("population") is not None]
    sizes = sorted({b for _, _, b in pairs}, reverse=True)
    fit, r = slope([g for g, _, _ in pairs], [e for _, e, _ in pairs]) if len(sizes) >= 2 else (None, math.nan)
    if fit is None or not fit.has_interval:
        verdict, why = "inconclusive", "needs BN runs with probes at 2 or more batch sizes, 3 or more in all"
    else:
        verdict, why = sign_verdict(fit, +1)
    per_size = "; ".join(f"{b}: gap {format_summary(summarize([g for g, _, s in pairs if s == b]))}, error "
                         f"{format_summary(summarize([e for _, e, s in pairs if s == b]))}" for b in sizes)
    numbers = (f"slope {format_difference(fit)} points of test error per population std of gap, r = {r:.2f}, "
               f"{len(pairs)} runs; per batch size (last epoch): {per_size}" if fit
               else per_size or "no finished BN runs with probes")
    finding = [CLAIM, numbers, f"**{verdict}**" + (f" ({why})" if why else "")]
    return finding, share_lines(bn, probes, sizes)


def share_lines(bn: dict[int, Point], probes: dict[str, RunProbes], sizes: list[int]) -> list[str]:
    """How much of BN's small-batch penalty testing with batch statistics takes back (last epoch)."""
    if len(sizes) < 2:
        return []
    small, large = sizes[-1], sizes[0]

    def errors(batch, kind):
        return [probes[r.id].final_test_error(kind) for r in bn[batch].runs
                if r.final is not None and r.id in probes and probes[r.id].final_test_error(kind) is not None]

    penalty = difference(errors(small, "population"), errors(large, "population"))
    change = summarize([b - p for b, p in zip(errors(small, "batch"), errors(small, "population"))])
    if penalty is None or change is None:
        return []
    text = (f"- At the last epoch, BN's test error at {small} images per device is {format_difference(penalty)} "
            f"points above its error at {large} (its small-batch penalty, Welch interval). Testing with the batch "
            f"statistics that training used (device batches of {small} test images) instead of the population "
            f"statistics changes it by {format_difference(change)} points (paired: the same test images and runs)")
    if penalty.mean > 0 and change.mean < 0:
        text += (f": the train/test inconsistency of the statistics accounts for "
                 f"{100 * -change.mean / penalty.mean:.0f} % of the penalty")
        if not (penalty.has_interval and penalty.low > 0 and change.has_interval and change.high < 0):
            text += " (a point estimate: an interval of its parts reaches 0, so the share is not established)"
    elif penalty.mean > 0:
        text += (": population statistics at test time do better than batch statistics, so none of the penalty "
                 "is taken back by testing as training normalizes")
    else:
        text += ": BN shows no small-batch penalty here, so there is no share to attribute"
    return [text + ".", ""]


def gap_table(ctx, bn: dict[int, Point], probes: dict[str, RunProbes]) -> list[str]:
    rows = []
    for b in sorted(bn, reverse=True):
        mine = [probes[r.id] for r in bn[b].runs if r.id in probes]
        pop = summarize([m.final_test_error("population") for m in mine])
        bat = summarize([m.final_test_error("batch") for m in mine])
        diffs = summarize([m.final_test_error("batch") - m.final_test_error("population") for m in mine
                           if m.final_test_error("batch") is not None])
        rows.append([b, format_summary(summarize([m.gap() for m in mine])),
                     format_summary(summarize([m.trends.get("batch_log_std_ratio", [math.nan])[-1] for m in mine])),
                     cell(bn[b], ctx.single), format_summary(pop), format_summary(bat), format_difference(diffs)])
    return [table(["batch per device", "gap: batch mean shift (pop. stds)", "gap: log std ratio (RMS)",
                   f"test error (%), {ctx.number}", "last epoch, population statistics",
                   "last epoch, batch statistics", "batch − population"], rows), ""]


def ablation_table(ctx, points: list[Point]) -> list[str]:
    """Error per norm at each batch size, against its full norm and against no norm (Welch)."""
    by_key = {(p.norm, p.cfg.batch_size): p for p in points}
    rows = []
    for p in sorted(points, key=lambda p: (-p.cfg.batch_size, ablation_order(p.norm))):
        full = by_key.get((full_norm(p.norm), p.cfg.batch_size)) if full_norm(p.norm) else None
        none = by_key.get(("none", p.cfg.batch_size))
        rows.append([p.cfg.batch_size, label(p.norm), cell(p, ctx.single),
                     f"{format_difference(difference(p.finals, full.finals))} vs {label(full.norm)}" if full else "-",
                     format_difference(difference(p.finals, none.finals)) if none and none is not p else "-"])
    return [table(["batch per device", "norm", f"test error (%), {ctx.number}", "− its full norm", "− no norm"],
                  rows), ""]


def inside(ctx) -> list[str]:
    points, model = ctx.points, ctx.model
    probes = load([r for p in points for r in p.runs], warn_stderr)

    def runs_of(p: Point) -> list[RunProbes]:
        return [probes[r.id] for r in p.runs if r.id in probes]

    md = ["What each norm does to the network, from probes taken at initialization and after every epoch "
          "on a fixed set of training images (README, *Inside the network*, says how to read each figure).", ""]
    ablated = [p for p in points if any(is_ablation(q.norm) for q in points if q.cfg.batch_size == p.cfg.batch_size)]
    if not probes:
        return md + ["No run of this study recorded probes: train it with `--probes`.", ""] + \
            (ablation_table(ctx, ablated) if ablated else [])

    bn = {p.cfg.batch_size: p for p in points if p.norm == "bn"}
    gaps = {}
    for p in points:
        if is_batch_dependent(p.norm) and runs_of(p):
            gaps.setdefault(p.norm, {})[p.cfg.batch_size] = runs_of(p)
    gaps = {n: g for n, g in gaps.items() if len(g) >= 2}
    if gaps:
        md += ctx.figure(figs.gap(ctx.plt, gaps, f"{ctx.name}: batch statistics against population statistics, "
                                                 f"last epoch"),
                         f"inside_gap_{model}.png", "statistic gap against batch size")
        md += ["How far a device batch's statistics lie from the population statistics that evaluation uses, "
               "per statistics layer (thin lines, shallow to deep) and on average (black): the mean shift in "
               "population standard deviations and the log ratio of the standard deviations, root mean "
               "square over channels and device batches. 0 is a batch that normalizes exactly as the test will.", ""]
    if len(bn) >= 2:
        finding, share = gap_finding(bn, probes)
        md += ["BN's statistic gap and its errors per batch size: the gap (mean over layers) and the test errors "
               "with population and with batch statistics (on the same test images) at the last epoch, beside the "
               f"run's test error ({ctx.number}):", ""] + gap_table(ctx, bn, probes)
        md += [table(["claim", "this study", "verdict"], [finding]), "", f"- {RULE}"] + share

    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    for b in sizes:
        here = {p.norm: runs_of(p) for p in points if p.cfg.batch_size == b and runs_of(p)}
        if len(here) >= 2:
            md += ctx.figure(figs.trends(ctx.plt, here, f"{ctx.name}, batch {b} per device: probes per epoch"),
                             f"inside_trends_{model}_b{b}.png", f"probe trajectories at batch {b}")
    widest = max(sizes, key=lambda b: (sum(1 for p in points if p.cfg.batch_size == b and runs_of(p)), b))
    here = {p.norm: runs_of(p) for p in points if p.cfg.batch_size == widest and runs_of(p)}
    if len(here) >= 2:
        md += ctx.figure(figs.depth(ctx.plt, here, f"{ctx.name}, batch {widest} per device: probes against depth, "
                                                   f"last epoch"),
                         f"inside_depth_{model}_b{widest}.png", f"probes against depth at batch {widest}")
    if ablated:
        by_batch = {}
        for p in sorted(ablated, key=lambda p: ablation_order(p.norm)):
            by_batch.setdefault(p.cfg.batch_size, []).append(p)
        if any(p.summary() for p in ablated):
            md += ctx.figure(figs.ablations(ctx.plt, by_batch, f"{ctx.name}: full norms, their ablations and no norm",
                                            f"test error (%), {ctx.number}"),
                             f"inside_ablations_{model}.png", "ablations beside the full norms")
        md += ["Each ablation against the norm it comes from and against no normalization (differences in points "
               "of error, Welch 95 % interval): mean-only keeps the centring, scale-only the division by the RMS.", ""]
        md += ablation_table(ctx, ablated)
    return md
