"""Findings: each claim of the implementation report and the GN paper that a study can test,
with this study's numbers and a verdict: agrees, disagrees or inconclusive.

The verdict rules are the docstrings of `sign_verdict`, `flat_verdict` and `best_verdict`;
the report prints them, so the text a reader sees is the rule the code applies. Every
interval is a 95 % interval over seeds (Student t for a mean, Welch for a difference,
Welch-Satterthwaite for a difference of differences; see stats.py), not corrected for the
number of claims tested.
"""
from __future__ import annotations

import collections
import inspect
from dataclasses import dataclass

from ..references import Published, find, settings
from ..stats import Summary, contrast, difference, format_difference, format_summary
from .labels import family, label, sweep_value
from .published import short_setting, sweep_gn
from .runs import Point

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
FLAT_MARGIN = 1.0  # points of error: a change smaller than this counts as flat
NO_INTERVAL = "fewer than 2 finished seeds on a side: no interval"
# What a source says in words where it gives no numbers (shown when that source is loaded).
SAID = {"bn-degrades": ("impl-report", "impl. report, CIFAR-10 ResNet-56: BN holds up down to batch 8 "
                                       "(≈, read off its figure)"),
        "gn-flat": ("impl-report", "impl. report, CIFAR-10 ResNet-56: \"GN is more stable than BN\"")}


@dataclass
class Finding:
    claim: str
    published: str      # what the sources measured, each with its setting
    model: str
    numbers: str        # this study's numbers
    verdict: str
    why: str = ""       # the reason for an inconclusive verdict


def sign_verdict(d: Summary | None, expected: int) -> tuple[str, str]:
    """A claim that one error is higher than another: the difference d (predicted positive,
    or negative) agrees when its 95 % interval lies wholly on the predicted side of 0,
    disagrees when it lies wholly on the other side, and is inconclusive when the interval
    contains 0 or when a point has fewer than 2 finished seeds (no interval)."""
    if d is None or not d.has_interval:
        return INCONCLUSIVE, NO_INTERVAL
    if expected * d.low > 0 and expected * d.high > 0:
        return AGREES, ""
    if expected * d.low < 0 and expected * d.high < 0:
        return DISAGREES, ""
    return INCONCLUSIVE, "the interval contains 0"


def flat_verdict(d: Summary | None) -> tuple[str, str]:
    """A claim that an error stays flat: the change d agrees when its 95 % interval lies wholly
    within ± FLAT_MARGIN points, disagrees when it lies wholly outside that band (a real
    change), and is inconclusive otherwise (the interval is too wide to tell) or with fewer
    than 2 finished seeds per point."""
    if d is None or not d.has_interval:
        return INCONCLUSIVE, NO_INTERVAL
    if -FLAT_MARGIN < d.low and d.high < FLAT_MARGIN:
        return AGREES, ""
    if d.low > FLAT_MARGIN or d.high < -FLAT_MARGIN:
        return DISAGREES, ""
    return INCONCLUSIVE, f"the interval reaches beyond ± {n_points(FLAT_MARGIN)}"


def best_verdict(claimed, points: dict, name=str) -> tuple[str, str]:
    """A claim that one setting S is the best: it agrees when, against every other setting
    tested, the 95 % interval of S's error minus the other's lies wholly below 0; it disagrees
    when some other setting's is wholly above 0 (that setting is better); otherwise, or with
    fewer than 2 finished seeds per point, it is inconclusive (S is tied with some setting)."""
    diffs = {v: difference(points[claimed].finals, p.finals) for v, p in points.items() if v != claimed}
    if any(d is None or not d.has_interval for d in diffs.values()):
        return INCONCLUSIVE, NO_INTERVAL
    if any(d.low > 0 for d in diffs.values()):
        return DISAGREES, ""
    if all(d.high < 0 for d in diffs.values()):
        return AGREES, ""
    tied = sorted(v for v, d in diffs.items() if d.high >= 0)
    return INCONCLUSIVE, f"tied with {', '.join(name(v) for v in tied)}"


def n_points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def rules() -> list[str]:
    """The verdict rules as the report prints them."""
    return [inspect.cleandoc(f.__doc__).replace("\n", " ").replace("FLAT_MARGIN points", n_points(FLAT_MARGIN))
            for f in (sign_verdict, flat_verdict, best_verdict)]


def fmt(point: Point) -> str:
    return format_summary(point.summary())


def by_norm_batch(points: list[Point]) -> dict[tuple[str, int], Point]:
    """(norm, batch) -> point; of several (e.g. other virtual GPUs), the one with most seeds."""
    out: dict[tuple[str, int], Point] = {}
    for p in points:
        key = (p.norm, p.cfg.batch_size)
        if key not in out or len(p.finals) > len(out[key].finals):
            out[key] = p
    return out


def gn_of(cells: dict[tuple[str, int], Point]) -> str | None:
    """The GN variant to compare with BN: the one present at the most batch sizes."""
    counts = collections.Counter(n for n, _ in cells if family(n) == "gn")
    return counts.most_common(1)[0][0] if counts else None


def sweep(points: list[Point], key: str) -> dict[int, Point]:
    """G (or channels per group) -> point, at the sweep's most common batch size."""
    pts = [p for p in points if sweep_value(p.norm, key) and p.finals]
    if not pts:
        return {}
    batch = collections.Counter(p.cfg.batch_size for p in pts).most_common(1)[0][0]
    cells = by_norm_batch([p for p in pts if p.cfg.batch_size == batch])
    return {sweep_value(n, key): p for (n, _), p in cells.items()}


def findings(model: str, batch_points: list[Point], group_points: list[Point],
             published: list[Published]) -> tuple[list[Finding], list[str]]:
    """The findings for one model, and the claims these runs cannot test (with why)."""
    out, untested = [], []
    cells = by_norm_batch([p for p in batch_points if p.finals])
    gn = gn_of(cells)
    bn_sizes = sorted(b for n, b in cells if n == "bn")
    gn_sizes = sorted(b for n, b in cells if n == gn)
    both = sorted(set(bn_sizes) & set(gn_sizes))
    refs = list(settings(published).values())

    def add(claim, sources, numbers, verdict):
        out.append(Finding(claim, "; ".join(sources) or "-", model, numbers, *verdict))

    # 1. BN ahead of GN at batch 32
    claim = "BN is ahead of GN at batch 32 (lower error)"
    if 32 in both:
        bn, g = cells[("bn", 32)], cells[(gn, 32)]
        d = difference(g.finals, bn.finals)
        sources = [f"{short_setting(r[0])}: BN {a.text()}, {label(b.norm)} {b.text()}"
                   for r in refs for a, b in [(find(r, "bn", 32), find(r, sweep_gn(r) or "", 32))] if a and b]
        add(claim, sources, f"BN {fmt(bn)}; {label(gn)} {fmt(g)}; GN − BN {format_difference(d)}",
            sign_verdict(d, +1))
    else:
        untested.append(f"{claim}: no BN and GN runs at batch 32")

    large, small = (max(both), min(both)) if len(both) >= 2 else (None, None)
    if large is None:
        untested.append("BN degrades, GN stays flat and BN − GN grows as the batch shrinks: "
                        "needs BN and GN at two or more batch sizes (the batch-size study)")
    else:
        bl, bs, gl, gs = (cells[k] for k in (("bn", large), ("bn", small), (gn, large), (gn, small)))
        # 2. BN degrades
        d = difference(bs.finals, bl.finals)
        sources = [f"{short_setting(r[0])}: BN {a.text()} at {a.batch_size} → {b.text()} at {b.batch_size}"
                   for r in refs for a, b in [ends(r, "bn")] if a]
        sources += said("bn-degrades", refs)
        add(f"BN's error rises as the batch shrinks ({large} → {small})", sources,
            f"BN {fmt(bl)} at {large}, {fmt(bs)} at {small}; change {format_difference(d)}",
            sign_verdict(d, +1))
        # 3. GN flat
        d = difference(gs.finals, gl.finals)
        sources = [f"{short_setting(r[0])}: {label(a.norm)} {a.text()} at {a.batch_size} → {b.text()} at {b.batch_size}"
                   for r in refs for a, b in [ends(r, sweep_gn(r))] if a]
        sources += said("gn-flat", refs)
        add(f"GN's error stays flat as the batch shrinks (within ± {n_points(FLAT_MARGIN)})", sources,
            f"{label(gn)} {fmt(gl)} at {large}, {fmt(gs)} at {small}; change {format_difference(d)}",
            flat_verdict(d))
        # 4. BN − GN grows
        c = contrast([(1, bs.finals), (-1, gs.finals), (-1, bl.finals), (1, gl.finals)])
        per_batch = ", ".join(f"{format_difference(difference(cells[('bn', b)].finals, cells[(gn, b)].finals))} at {b}"
                              for b in sorted(both, reverse=True))
        sources = []
        for r in refs:
            (a, b), g = ends(r, "bn"), sweep_gn(r)
            if a and g and find(r, g, a.batch_size) and find(r, g, b.batch_size):
                sources.append(f"{short_setting(a)}: BN − {label(g)} {a.error - find(r, g, a.batch_size).error:+.1f} "
                               f"at {a.batch_size} → {b.error - find(r, g, b.batch_size).error:+.1f} at {b.batch_size}")
        add("The gap BN − GN grows as the batch shrinks", sources,
            f"BN − {label(gn)}: {per_batch}; growth {format_difference(c)}", sign_verdict(c, +1))

    # 5-7. group count and channels per group
    for key, what, unit in (("groups", "group count", "G = {}"), ("per_group", "channels per group", "{} channels per group")):
        mine = sweep(group_points, key)
        claimed = collections.defaultdict(list)
        for r in refs:
            theirs = sorted((sweep_value(p.norm, key), p) for p in r if p.batch_size == 32 and sweep_value(p.norm, key))
            if len(theirs) >= 2:
                best = min(theirs, key=lambda vp: vp[1].error)
                claimed[best[0]].append(f"{short_setting(r[0])}: best {unit.format(best[0])} ({best[1].text()}) "
                                        f"of {', '.join(str(v) for v, _ in theirs)}")
        for value, sources in claimed.items():
            claim = f"{unit.format(value)} is the best {what}"
            if value not in mine or len(mine) < 2:
                untested.append(f"{claim}: the study has no {what} sweep with {unit.format(value)}")
                continue
            top = min(mine, key=lambda v: mine[v].summary().mean)
            add(claim, sources, "; ".join(f"{unit.format(v)}: {fmt(p)}" for v, p in sorted(mine.items()))
                + f"; lowest: {unit.format(top)}", best_verdict(value, mine, unit.format))
        if key == "groups":  # 6. fewer groups do worse
            claim = "Fewer groups do worse (the fewest groups tested against the most)"
            if len(mine) < 2:
                untested.append(f"{claim}: needs a group sweep")
                continue
            lo, hi = min(mine), max(mine)
            d = difference(mine[lo].finals, mine[hi].finals)
            sources = []
            for r in refs:
                theirs = sorted((sweep_value(p.norm, key), p) for p in r if p.batch_size == 32 and sweep_value(p.norm, key))
                if len(theirs) >= 2:
                    sources.append(f"{short_setting(r[0])}: G = {theirs[0][0]} {theirs[0][1].text()}, "
                                   f"G = {theirs[-1][0]} {theirs[-1][1].text()}")
            add(claim, sources, f"G = {lo}: {fmt(mine[lo])}; G = {hi}: {fmt(mine[hi])}; "
                f"difference {format_difference(d)}", sign_verdict(d, +1))
    return out, untested


def said(claim: str, refs: list[list[Published]]) -> list[str]:
    source, text = SAID[claim]
    return [text] if any(r[0].source == source for r in refs) else []


def ends(numbers: list[Published], norm: str | None) -> tuple[Published | None, Published | None]:
    """A norm's numbers at the largest and the smallest batch size in one setting."""
    mine = sorted((p for p in numbers if norm and p.norm == norm), key=lambda p: -p.batch_size)
    return (mine[0], mine[-1]) if len(mine) >= 2 else (None, None)


def section(all_findings: list[Finding], untested: list[str]) -> list[str]:
    """The findings section of report.md."""
    from .tables import table
    md = ["## Findings", "",
          "Each claim of the implementation report (CIFAR-10) and of the GN paper (ImageNet) that "
          "these runs can test, with this study's numbers: the median test error (%) of the final "
          "5 epochs, mean ± std over seeds [95 % interval]; differences and changes in points of "
          "error [95 % interval].", ""]
    if all_findings:
        md += [table(["claim", "published (setting)", "model", "this study", "verdict"],
                     [[f.claim, f.published, f.model, f.numbers,
                       f"**{f.verdict}**" + (f" ({f.why})" if f.why else "")] for f in all_findings]), ""]
    else:
        md += ["These runs test none of the claims below.", ""]
    md += ["How a verdict is reached:", ""] + [f"- {rule}" for rule in rules()]
    md += ["- Intervals are not corrected for the number of claims tested, and a verdict speaks "
           "for this study's setting only (model, data, schedule), not for the source's.", ""]
    if untested:
        md += ["Not tested by these runs:", ""] + [f"- {u}" for u in dict.fromkeys(untested)] + [""]
    return md
