"""Findings: each claim of the implementation report and the GN paper that a setup's runs can
test, with their numbers and a verdict: agrees, disagrees or inconclusive.

A setup (setups.py) holds runs that differ only in norm, batch size and seed, so every claim
compares like with like. The verdict rules are the docstrings of `sign_verdict`,
`flat_verdict` and `best_verdict`, and `RULES` says how seeds count and are compared; the
report prints them, so the text a reader sees is the rule the code applies. Each claim's chance
of a false "agrees" or "disagrees" is at most 5 % (tests/test_verdicts.py checks it by
simulation); claims are not corrected against each other.
"""
from __future__ import annotations

import collections
import inspect
from dataclasses import dataclass

from ..config import RunConfig
from ..references import Published, find, settings
from ..stats import LEVEL, Summary, contrast, difference, format_difference, format_summary, holm, holm_adjusted
from .labels import family, label, sweep_value
from .published import short_setting, sweep_gn
from .runs import Point
from .tables import table

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
ALPHA = 1 - LEVEL
FLAT_MARGIN = 1.0  # points of error: a change smaller than this counts as flat (--flat-margin)
NO_INTERVAL = "fewer than 2 seeds that count on a side: no interval"
# What a source says in words where it gives no numbers (shown when that source is loaded).
SAID = {"bn-degrades": ("impl-report", "impl. report, CIFAR-10 ResNet-56: BN holds up down to batch 8 "
                                       "(≈, read off its figure)"),
        "gn-flat": ("impl-report", "impl. report, CIFAR-10 ResNet-56: \"GN is more stable than BN\"")}


@dataclass
class Finding:
    claim: str
    published: str      # what the sources measured, each with its setting
    setup: str          # the setup's title (model, devices × N, what tells it apart)
    numbers: str        # this setup's numbers
    verdict: str
    why: str = ""       # the reason for an inconclusive verdict


def sign_verdict(d: Summary | None, expected: int) -> tuple[str, str]:
    """A claim that one error is higher than another: the difference d (predicted positive,
    or negative) agrees when its 95 % interval lies wholly on the predicted side of 0,
    disagrees when it lies wholly on the other side, and is inconclusive when the interval
    contains 0 or when a point has fewer than 2 seeds that count (no interval)."""
    if d is None or not d.has_interval:
        return INCONCLUSIVE, NO_INTERVAL
    if expected * d.low > 0 and expected * d.high > 0:
        return AGREES, ""
    if expected * d.low < 0 and expected * d.high < 0:
        return DISAGREES, ""
    return INCONCLUSIVE, "the interval contains 0"


def outside(d: Summary, margin: float) -> float:
    """p-value of 'the change lies beyond ± margin' (two-sided like the 95 % interval: at most
    0.05 exactly when that interval lies wholly above margin or wholly below −margin)."""
    return min(1.0, 2 * min(d.p_value(margin, +1), d.p_value(-margin, -1)))


def flat_verdict(changes: list[Summary | None], margin: float = FLAT_MARGIN) -> tuple[str, str]:
    """A claim that an error stays flat: the change from the largest batch to each smaller one
    agrees when every change's 95 % interval lies within ± FLAT_MARGIN points, disagrees when
    some change lies beyond that band (its p-value of 'beyond the band' below 5 % after Holm's
    correction across the batch sizes), and is inconclusive otherwise (an interval too wide
    to tell) or with fewer than 2 seeds that count per point."""
    if not changes or any(d is None or not d.has_interval for d in changes):
        return INCONCLUSIVE, NO_INTERVAL
    if all(-margin < d.low and d.high < margin for d in changes):
        return AGREES, ""
    if any(holm([outside(d, margin) for d in changes], ALPHA)):
        return DISAGREES, ""
    return INCONCLUSIVE, f"an interval reaches beyond ± {n_points(margin)}"


def best_verdict(claimed, values: dict, name=str) -> tuple[str, str]:
    """A claim that one setting S is the best: S's error minus each other setting's, tested
    two-sided with Holm's correction across the other settings (family-wise 5 %). It agrees
    when every difference is significantly below 0, disagrees when some other setting is
    significantly better, and is otherwise inconclusive (S is tied with the settings named),
    as it is with fewer than 2 seeds that count per point."""
    others = [v for v in values if v != claimed]
    diffs = [difference(values[claimed], values[v]) for v in others]
    if not others or any(d is None or not d.has_interval for d in diffs):
        return INCONCLUSIVE, NO_INTERVAL
    p = [d.p_value() for d in diffs]
    rejected = holm(p, ALPHA)
    if any(r and d.mean > 0 for r, d in zip(rejected, diffs)):
        return DISAGREES, ""
    if all(r and d.mean < 0 for r, d in zip(rejected, diffs)):
        return AGREES, ""
    adjusted = holm_adjusted(p)
    tied = sorted((v, q) for v, q, r in zip(others, adjusted, rejected) if not r)
    return INCONCLUSIVE, "tied with " + ", ".join(f"{name(v)} (Holm-adjusted p {q:.2f})" for v, q in tied)


def n_points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


RULES = [  # the sign convention (A − B, positive where A is worse) is said once, atop the report
    "Seeds that count: a finished seed gives the median test error of its final epochs; a diverged "
    "seed counts at chance error (90 % on CIFAR-10, 99 % on CIFAR-100), the error of the model it "
    "leaves (its weights are not finite, so it gives every image the same class). Leaving it out "
    "would report the surviving seeds only, biased in favour of the norm that diverged (typically BN "
    "at small batches, where the main claim lies); counting it widens the interval, so that one "
    "diverged seed of several leaves a verdict inconclusive unless the difference is large, and a "
    "setting that diverges with most seeds loses. Failed seeds (crashes) and unfinished ones are left "
    "out; every point says how many of its seeds diverged, failed or are unfinished.",
    "A difference is paired over seeds when both points hold the same seeds (in normlab the same seed "
    "gives every norm the same initial convolutions and data order, so per-seed differences remove the "
    "seed's share of the spread) and uses Welch's interval otherwise; each difference says which.",
    "Each claim's chance of a false *agrees* or *disagrees* is at most 5 %: 2.5 % each way for a claim "
    "on one difference, and Holm's correction across the comparisons of a claim that makes several "
    "(\"S is the best\", \"flat at every batch size\"). Claims are not corrected against each other: "
    "with k claims expect up to 0.05 k false verdicts.",
    "\"Lowest\" names the setting with the lowest mean test error: it is chosen on the same test-set "
    "numbers, so it describes these runs and is no finding; the verdict is the test.",
]


def flat_reason(margin: float) -> str:
    return (f"The flat margin is ± {n_points(margin)} (`normlab report --flat-margin`; choose it from "
            f"your question, before looking at the results). The default of 1 point lies well above the "
            f"published movement of GN across batch sizes (0.2 points from 32 to 2 images per GPU on "
            f"ImageNet, GN paper Table 2) and the seed-to-seed spread of a CIFAR-10 ResNet (std 0.16 over "
            f"5 runs of He et al.'s ResNet-110), and a tenth of BN's published degradation (11.1 points).")


def rules(margin: float = FLAT_MARGIN) -> list[str]:
    """The verdict rules as the report prints them."""
    verdicts = [inspect.cleandoc(f.__doc__).replace("\n", " ").replace("FLAT_MARGIN points", n_points(margin))
                for f in (sign_verdict, flat_verdict, best_verdict)]
    return verdicts + RULES + [flat_reason(margin)]


def fmt(point: Point) -> str:
    note = point.seed_note()
    return format_summary(point.summary()) + (f" ({note})" if note else "")


def fmt_difference(d: Summary | None) -> str:
    """'+1.20 [+0.40, +2.00] (paired)'."""
    return format_difference(d) + (f" ({d.test})" if d is not None and d.has_interval and d.test else "")


def by_norm_batch(points: list[Point]) -> dict[tuple[str, int], Point]:
    """(norm, batch) -> point, within one setup (where there is one point per pair)."""
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
    """What one setup's runs offer the claims, and the published numbers per setting."""
    setup: str
    cfg: RunConfig                         # the setup's config (norm, batch and seed aside)
    cells: dict[tuple[str, int], Point]   # (norm, batch) -> point, from the batch-size and norms studies
    gn: str | None                         # the GN variant compared with BN
    sweeps: dict[str, dict[int, Point]]    # 'groups' / 'per_group' -> value -> point
    refs: list[list[Published]]            # the published numbers, one list per setting
    margin: float = FLAT_MARGIN

    def sizes(self) -> list[int]:
        """Batch sizes with both BN and GN results."""
        return sorted({b for n, b in self.cells if n == "bn"} & {b for n, b in self.cells if n == self.gn})

    def finding(self, claim, sources, numbers, verdict) -> Finding:
        return Finding(claim, "; ".join(sources) or "-", self.setup, numbers, *verdict)

    def where(self, p: Published) -> str:
        """A source's setting, saying when it is this setup's own."""
        return short_setting(p) + (" (same setting)" if p.same_setting(self.cfg) else "")


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
    d = difference(bn.by_seed, gn.by_seed)
    sources = []
    for r in ev.refs:
        a, b = find(r, "bn", 32), find(r, sweep_gn(r) or "", 32)
        if a and b:
            sources.append(f"{ev.where(a)}: BN {a.text()}, {label(b.norm)} {b.text()}")
    return [ev.finding(claim, sources, f"BN {fmt(bn)}; {label(ev.gn)} {fmt(gn)}; BN − {label(ev.gn)} "
                       f"{fmt_difference(d)}", sign_verdict(d, -1))]


def batch_trends(ev: Evidence) -> list:
    """BN degrades, GN stays flat at every batch size, and BN − GN grows, from the largest batch
    to the smallest."""
    sizes = ev.sizes()
    if len(sizes) < 2:
        return ["BN degrades, GN stays flat and BN − GN grows as the batch shrinks: needs BN and GN "
                "at two or more batch sizes (the batch-size study)"]
    large, small = max(sizes), min(sizes)
    bl, bs, gl, gs = (ev.cells[k] for k in (("bn", large), ("bn", small), (ev.gn, large), (ev.gn, small)))
    out = []
    d = difference(bs.by_seed, bl.by_seed)
    sources = [f"{ev.where(a)}: BN {a.text()} at {a.batch_size} → {b.text()} at {b.batch_size}"
               for a, b in (ends(r, "bn") for r in ev.refs) if a]
    out.append(ev.finding(f"BN's error rises as the batch shrinks ({large} → {small})",
                          sources + said("bn-degrades", ev.refs),
                          f"BN {fmt(bl)} at {large}, {fmt(bs)} at {small}; BN at {small} − BN at {large} "
                          f"{fmt_difference(d)}", sign_verdict(d, +1)))
    smaller = [b for b in reversed(sizes) if b != large]
    changes = [difference(ev.cells[(ev.gn, b)].by_seed, gl.by_seed) for b in smaller]
    sources = [f"{ev.where(a)}: {label(a.norm)} {a.text()} at {a.batch_size} → {b.text()} at {b.batch_size}"
               for a, b in (ends(r, sweep_gn(r)) for r in ev.refs) if a]
    gn_name = label(ev.gn)
    out.append(ev.finding(f"GN's error stays flat as the batch shrinks (within ± {n_points(ev.margin)} of "
                          f"batch {large} at every smaller batch)", sources + said("gn-flat", ev.refs),
                          f"{gn_name} {fmt(gl)} at {large}; "
                          + "; ".join(f"at {b}: {fmt(ev.cells[(ev.gn, b)])}, minus at {large} {fmt_difference(c)}"
                                      for b, c in zip(smaller, changes)),
                          flat_verdict(changes, ev.margin)))
    growth = contrast([(1, bs.by_seed), (-1, gs.by_seed), (-1, bl.by_seed), (1, gl.by_seed)])
    gaps = ", ".join(f"{fmt_difference(difference(ev.cells[('bn', b)].by_seed, ev.cells[(ev.gn, b)].by_seed))} at {b}"
                     for b in reversed(sizes))
    sources = []
    for r in ev.refs:
        (a, b), g = ends(r, "bn"), sweep_gn(r)
        ga, gb = (find(r, g, a.batch_size), find(r, g, b.batch_size)) if a and g else (None, None)
        if ga and gb:
            sources.append(f"{ev.where(a)}: BN − {label(g)} {a.error - ga.error:+.1f} at {a.batch_size} "
                           f"→ {b.error - gb.error:+.1f} at {b.batch_size}")
    out.append(ev.finding("The gap BN − GN grows as the batch shrinks", sources,
                          f"BN − {gn_name}: {gaps}; at {small} minus at {large} {fmt_difference(growth)}",
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
                claimed[value].append(f"{ev.where(best)}: best {unit.format(value)} ({best.text()}) "
                                      f"of {', '.join(str(v) for v, _ in theirs)}")
        for value, sources in claimed.items():
            claim = f"{unit.format(value)} is the best {what}"
            if value not in mine or len(mine) < 2:
                out.append(f"{claim}: the study has no {what} sweep with {unit.format(value)}")
                continue
            top = min(mine, key=lambda v: mine[v].summary().mean)
            numbers = "; ".join(f"{unit.format(v)}: {fmt(p)}" for v, p in sorted(mine.items()))
            out.append(ev.finding(claim, sources, f"{numbers}; lowest mean (chosen on these test numbers): "
                                  f"{unit.format(top)}",
                                  best_verdict(value, {v: p.by_seed for v, p in mine.items()}, unit.format)))
        return out
    return claims


def fewer_groups_worse(ev: Evidence) -> list:
    claim = "Fewer groups do worse (the fewest groups tested against the most)"
    mine = ev.sweeps["groups"]
    if len(mine) < 2:
        return [f"{claim}: needs a group sweep (the groups study)"]
    lo, hi = min(mine), max(mine)
    d = difference(mine[lo].by_seed, mine[hi].by_seed)
    sources = [f"{ev.where(theirs[0][1])}: G = {theirs[0][0]} {theirs[0][1].text()}, "
               f"G = {theirs[-1][0]} {theirs[-1][1].text()}"
               for theirs in (published_sweep(r, "groups") for r in ev.refs) if len(theirs) >= 2]
    return [ev.finding(claim, sources, f"G = {lo}: {fmt(mine[lo])}; G = {hi}: {fmt(mine[hi])}; "
                       f"G = {lo} − G = {hi} {fmt_difference(d)}", sign_verdict(d, +1))]


# the claims, in the report's order
CLAIMS = (bn_ahead, batch_trends, best_setting("groups", "group count", "G = {}"), fewer_groups_worse,
          best_setting("per_group", "channels per group", "{} channels per group"))


def findings(setup: str, cfg: RunConfig, batch_points: list[Point], group_points: list[Point],
             published: list[Published], margin: float = FLAT_MARGIN) -> tuple[list[Finding], list[str]]:
    """The findings for one setup (its title and config), and the claims these runs cannot
    test (with why). Every point must belong to that setup."""
    cells = by_norm_batch([p for p in batch_points if p.finals])
    ev = Evidence(setup, cfg, cells, gn_of(cells), {k: sweep(group_points, k) for k in ("groups", "per_group")},
                  list(settings(published).values()), margin)
    results = [item for claim in CLAIMS for item in claim(ev)]
    return [r for r in results if isinstance(r, Finding)], [r for r in results if isinstance(r, str)]


def section(all_findings: list[Finding], untested: list[str], margin: float = FLAT_MARGIN) -> list[str]:
    """The findings section of report.md."""
    md = ["## Findings", "",
          "Each claim of the implementation report (CIFAR-10) and of the GN paper (ImageNet) that "
          "these runs can test, per setup (runs that differ only in norm, batch size and seed), with "
          "the setup's numbers: the median test error (%) of the final epochs (how many: each study's "
          "setup), mean ± std over seeds [95 % interval]; differences in points of error [95 % interval] "
          "(paired or Welch).", ""]
    if all_findings:
        said_once = all(f.why == NO_INTERVAL for f in all_findings)  # the one-seed notice, at the top
        md += [table(["claim", "published (setting)", "setup", "this study", "verdict"],
                     [[f.claim, f.published, f.setup, f.numbers.replace(" (1 seed)", "") if said_once else f.numbers,
                       f"**{f.verdict}**" + (f" ({f.why})" if f.why and not said_once else "")]
                      for f in all_findings]), ""]
    else:
        md += ["These runs test none of the claims below.", ""]
    md += ["How a verdict is reached:", ""] + [f"- {rule}" for rule in rules(margin)]
    md += ["- A verdict speaks for its setup only (model, data, devices, schedule), not for the "
           "source's.", ""]
    if untested:
        md += ["Not tested by these runs:", ""] + [f"- {u}" for u in dict.fromkeys(untested)] + [""]
    return md
