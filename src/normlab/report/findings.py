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
from .tables import table

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


@dataclass
class Evidence:
    """What one model's runs offer the claims, and the published numbers per setting."""
    model: str
    cells: dict[tuple[str, int], Point]   # (norm, batch) -> point, from the batch-size and norms studies
    gn: str | None                         # the GN variant compared with BN
    sweeps: dict[str, dict[int, Point]]    # 'groups' / 'per_group' -> value -> point
    refs: list[list[Published]]            # the published numbers, one list per setting

    def sizes(self) -> list[int]:
        """Batch sizes with both BN and GN results."""
        return sorted({b for n, b in self.cells if n == "bn"} & {b for n, b in self.cells if n == self.gn})

    def finding(self, claim, sources, numbers, verdict) -> Finding:
        return Finding(claim, "; ".join(sources) or "-", self.model, numbers, *verdict)


def ends(numbers: list[Published], norm: str | None) -> tuple[Published | None, Published | None]:
    """A norm's numbers at the largest and the smallest batch size in one setting."""
    mine = sorted((p for p in numbers if norm and p.norm == norm), key=lambda p: -p.batch_size)
    return (mine[0], mine[-1]) if len(mine) >= 2 else (None, None)


def said(claim: str, refs: list[list[Published]]) -> list[str]:
    source, text = SAID[claim]
    return [text] if any(r[0].source == source for r in refs) else []


def published_sweep(numbers: list[Published], key: str) -> list[tuple[int, Published]]:
    return sorted((sweep_value(p.norm, key), p) for p in numbers if p.batch_size == 32 and sweep_value(p.norm, key))


# Each claim takes the evidence and returns findings, or strings: claims it cannot test, and why.
def bn_ahead(ev: Evidence) -> list:
    claim = "BN is ahead of GN at batch 32 (lower error)"
    if 32 not in ev.sizes():
        return [f"{claim}: no BN and GN runs at batch 32"]
    bn, gn = ev.cells[("bn", 32)], ev.cells[(ev.gn, 32)]
    d = difference(bn.finals, gn.finals)
    sources = []
    for r in ev.refs:
        a, b = find(r, "bn", 32), find(r, sweep_gn(r) or "", 32)
        if a and b:
            sources.append(f"{short_setting(a)}: BN {a.text()}, {label(b.norm)} {b.text()}")
    return [ev.finding(claim, sources, f"BN {fmt(bn)}; {label(ev.gn)} {fmt(gn)}; BN − GN {format_difference(d)}",
                       sign_verdict(d, -1))]


def batch_trends(ev: Evidence) -> list:
    """BN degrades, GN stays flat, and BN − GN grows, from the largest batch to the smallest."""
    sizes = ev.sizes()
    if len(sizes) < 2:
        return ["BN degrades, GN stays flat and BN − GN grows as the batch shrinks: needs BN and GN "
                "at two or more batch sizes (the batch-size study)"]
    large, small = max(sizes), min(sizes)
    bl, bs, gl, gs = (ev.cells[k] for k in (("bn", large), ("bn", small), (ev.gn, large), (ev.gn, small)))
    out = []
    d = difference(bs.finals, bl.finals)
    sources = [f"{short_setting(a)}: BN {a.text()} at {a.batch_size} → {b.text()} at {b.batch_size}"
               for a, b in (ends(r, "bn") for r in ev.refs) if a]
    out.append(ev.finding(f"BN's error rises as the batch shrinks ({large} → {small})",
                          sources + said("bn-degrades", ev.refs),
                          f"BN {fmt(bl)} at {large}, {fmt(bs)} at {small}; change {format_difference(d)}",
                          sign_verdict(d, +1)))
    d = difference(gs.finals, gl.finals)
    sources = [f"{short_setting(a)}: {label(a.norm)} {a.text()} at {a.batch_size} → {b.text()} at {b.batch_size}"
               for a, b in (ends(r, sweep_gn(r)) for r in ev.refs) if a]
    out.append(ev.finding(f"GN's error stays flat as the batch shrinks (within ± {n_points(FLAT_MARGIN)})",
                          sources + said("gn-flat", ev.refs),
                          f"{label(ev.gn)} {fmt(gl)} at {large}, {fmt(gs)} at {small}; change {format_difference(d)}",
                          flat_verdict(d)))
    growth = contrast([(1, bs.finals), (-1, gs.finals), (-1, bl.finals), (1, gl.finals)])
    gaps = ", ".join(f"{format_difference(difference(ev.cells[('bn', b)].finals, ev.cells[(ev.gn, b)].finals))} at {b}"
                     for b in reversed(sizes))
    sources = []
    for r in ev.refs:
        (a, b), g = ends(r, "bn"), sweep_gn(r)
        ga, gb = (find(r, g, a.batch_size), find(r, g, b.batch_size)) if a and g else (None, None)
        if ga and gb:
            sources.append(f"{short_setting(a)}: BN − {label(g)} {a.error - ga.error:+.1f} at {a.batch_size} "
                           f"→ {b.error - gb.error:+.1f} at {b.batch_size}")
    out.append(ev.finding("The gap BN − GN grows as the batch shrinks", sources,
                          f"BN − {label(ev.gn)}: {gaps}; growth {format_difference(growth)}",
                          sign_verdict(growth, +1)))
    return out


def best_setting(key: str, what: str, unit: str):
    """The claims 'S is the best <what>', one per best setting a source reports at batch 32."""
    def claims(ev: Evidence) -> list:
        mine, out = ev.sweeps[key], []
        claimed = collections.defaultdict(list)
        for r in ev.refs:
            theirs = published_sweep(r, key)
            if len(theirs) >= 2:
                value, best = min(theirs, key=lambda vp: vp[1].error)
                claimed[value].append(f"{short_setting(best)}: best {unit.format(value)} ({best.text()}) "
                                      f"of {', '.join(str(v) for v, _ in theirs)}")
        for value, sources in claimed.items():
            claim = f"{unit.format(value)} is the best {what}"
            if value not in mine or len(mine) < 2:
                out.append(f"{claim}: the study has no {what} sweep with {unit.format(value)}")
                continue
            top = min(mine, key=lambda v: mine[v].summary().mean)
            numbers = "; ".join(f"{unit.format(v)}: {fmt(p)}" for v, p in sorted(mine.items()))
            out.append(ev.finding(claim, sources, f"{numbers}; lowest: {unit.format(top)}",
                                  best_verdict(value, mine, unit.format)))
        return out
    return claims


def fewer_groups_worse(ev: Evidence) -> list:
    claim = "Fewer groups do worse (the fewest groups tested against the most)"
    mine = ev.sweeps["groups"]
    if len(mine) < 2:
        return [f"{claim}: needs a group sweep (the groups study)"]
    lo, hi = min(mine), max(mine)
    d = difference(mine[lo].finals, mine[hi].finals)
    sources = [f"{short_setting(theirs[0][1])}: G = {theirs[0][0]} {theirs[0][1].text()}, "
               f"G = {theirs[-1][0]} {theirs[-1][1].text()}"
               for theirs in (published_sweep(r, "groups") for r in ev.refs) if len(theirs) >= 2]
    return [ev.finding(claim, sources, f"G = {lo}: {fmt(mine[lo])}; G = {hi}: {fmt(mine[hi])}; "
                       f"G = {lo} − G = {hi}: {format_difference(d)}", sign_verdict(d, +1))]


# the claims, in the report's order
CLAIMS = (bn_ahead, batch_trends, best_setting("groups", "group count", "G = {}"), fewer_groups_worse,
          best_setting("per_group", "channels per group", "{} channels per group"))


def findings(model: str, batch_points: list[Point], group_points: list[Point],
             published: list[Published]) -> tuple[list[Finding], list[str]]:
    """The findings for one model, and the claims these runs cannot test (with why)."""
    cells = by_norm_batch([p for p in batch_points if p.finals])
    ev = Evidence(model, cells, gn_of(cells), {k: sweep(group_points, k) for k in ("groups", "per_group")},
                  list(settings(published).values()))
    results = [item for claim in CLAIMS for item in claim(ev)]
    return [r for r in results if isinstance(r, Finding)], [r for r in results if isinstance(r, str)]


def section(all_findings: list[Finding], untested: list[str]) -> list[str]:
    """The findings section of report.md."""
    md = ["## Findings", "",
          "Each claim of the implementation report (CIFAR-10) and of the GN paper (ImageNet) that "
          "these runs can test, with this study's numbers: the median test error (%) of the final "
          "epochs (how many: each study's setup), mean ± std over seeds [95 % interval]; differences "
          "and changes in points of error [95 % interval].", ""]
    if all_findings:
        said_once = all(f.why == NO_INTERVAL for f in all_findings)  # the one-seed notice, at the top
        md += [table(["claim", "published (setting)", "model", "this study", "verdict"],
                     [[f.claim, f.published, f.model, f.numbers.replace(" (1 seed)", "") if said_once else f.numbers,
                       f"**{f.verdict}**" + (f" ({f.why})" if f.why and not said_once else "")]
                      for f in all_findings]), ""]
    else:
        md += ["These runs test none of the claims below.", ""]
    md += ["How a verdict is reached:", ""] + [f"- {rule}" for rule in rules()]
    md += ["- Intervals are not corrected for the number of claims tested, and a verdict speaks "
           "for this study's setting only (model, data, schedule), not for the source's.", ""]
    if untested:
        md += ["Not tested by these runs:", ""] + [f"- {u}" for u in dict.fromkeys(untested)] + [""]
    return md
