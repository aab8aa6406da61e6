"""Uncertainty over seeds: means, differences, their Student-t intervals and p-values, and Holm.

A study point has one result per seed. With n >= 2 seeds the interval for the mean is
mean ± t(n-1) · std / √n. A difference of two points (BN − GN, say), or any signed sum of
points (`contrast`: a difference of differences), is tested one of two ways:

- **paired** when every point holds the same seeds (mappings seed -> value with equal keys,
  2 or more): the seeds share initialisation and data order across norms, so the per-seed
  differences are one sample, and the interval is t(n-1) · their std / √n;
- **Welch** otherwise (plain lists of values, or different seeds): independent means, unequal
  spreads, Welch-Satterthwaite degrees of freedom.

Every difference carries its test's name, standard error and degrees of freedom, so that a
caller can ask for its p-value (`p_value`) and correct a family of them (`holm`). With one
seed there is no interval: callers must say so rather than print a number that looks precise.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

# Student t quantiles and distribution; scipy.special loads far faster than scipy.stats
from scipy.special import stdtr, stdtrit

LEVEL = 0.95
PAIRED, WELCH = "paired", "Welch"


def t_quantile(level: float, dof: float) -> float:
    """The two-sided `level` quantile of Student's t with `dof` degrees of freedom (12.71 for
    95 % and 1 degree of freedom)."""
    return float(stdtrit(dof, 0.5 + level / 2))


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float                      # sample std (n - 1), 0 for one value; a difference's standard error
    low: float | None = None        # confidence interval of the mean; None with one value
    high: float | None = None
    level: float = LEVEL
    dof: float | None = None        # a difference's degrees of freedom (None: no interval)
    test: str = ""                  # a difference's test: PAIRED or WELCH

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    def p_value(self, null: float = 0.0, side: int = 0) -> float:
        """A difference's p-value against `null`: two-sided (side 0), or one-sided for the
        alternative that the true value lies above (side +1) or below (side -1) `null`.
        1.0 without an interval."""
        if not self.has_interval or self.dof is None:
            return 1.0
        if self.std == 0:
            above = self.mean > null
            below = self.mean < null
            return 0.0 if (side == 0 and (above or below)) or (side > 0 and above) or (side < 0 and below) else 1.0
        t = (self.mean - null) / self.std
        if side > 0:
            return float(stdtr(self.dof, -t))
        if side < 0:
            return float(stdtr(self.dof, t))
        return float(min(1.0, 2 * stdtr(self.dof, -abs(t))))


def finite(values) -> list[float]:
    values = values.values() if isinstance(values, Mapping) else values
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def summarize(values, level: float = LEVEL) -> Summary | None:
    """Mean, std and the t-interval of the mean of `values` (finite numbers, or a mapping
    seed -> value); None if empty."""
    values = finite(values)
    if not values:
        return None
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, 0.0, level=level)
    std = statistics.stdev(values)
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, level)


def half_width(n: int, level: float = LEVEL) -> float:
    """Half-width of the interval of a mean of n values, in standard deviations: t(n-1)/√n."""
    return t_quantile(level, n - 1) / math.sqrt(n)


def difference(a, b, level: float = LEVEL) -> Summary | None:
    """mean(a) − mean(b): paired over the seeds when a and b are mappings seed -> value with
    the same seeds, Welch's interval otherwise; no interval unless both have 2+ values."""
    return contrast([(1.0, a), (-1.0, b)], level)


def pairs(terms) -> list[float] | None:
    """Per seed, Σ c·value, when every term is a mapping over the same 2+ seeds; else None."""
    if not all(isinstance(v, Mapping) for _, v in terms):
        return None
    clean = [{s: x for s, x in v.items() if x is not None and math.isfinite(x)} for _, v in terms]
    seeds = set(clean[0])
    if len(seeds) < 2 or any(set(v) != seeds for v in clean):
        return None
    return [sum(c * v[s] for (c, _), v in zip(terms, clean)) for s in sorted(seeds)]


def contrast(terms, level: float = LEVEL) -> Summary | None:
    """Σ c·mean(values) over the groups of `terms`, a list of (coefficient, values), with a
    t-interval: paired when every group is a mapping over the same seeds (see the module's
    docstring), else Welch-Satterthwaite. Two terms (+1, a), (−1, b) give a difference; four a
    difference of differences, e.g. how much BN − GN grows from batch 32 to batch 2. No
    interval unless every group has 2+ values (std is then nan)."""
    per_seed = pairs(terms)
    if per_seed is not None:
        n, estimate = len(per_seed), statistics.fmean(per_seed)
        se = statistics.stdev(per_seed) / math.sqrt(n)
        half = t_quantile(level, n - 1) * se
        return Summary(n, estimate, se, estimate - half, estimate + half, level, n - 1, PAIRED)
    summaries = [(c, summarize(v, level)) for c, v in terms]
    if any(s is None for _, s in summaries):
        return None
    estimate = sum(c * s.mean for c, s in summaries)
    n = min(s.n for _, s in summaries)
    if n < 2:
        return Summary(n, estimate, float("nan"), level=level, test=WELCH)
    parts = [c * c * s.std ** 2 / s.n for c, s in summaries]  # variance of each term's mean
    se = math.sqrt(sum(parts))
    if se == 0:
        return Summary(n, estimate, 0.0, estimate, estimate, level, float("inf"), WELCH)
    dof = sum(parts) ** 2 / sum(v * v / (s.n - 1) for v, (_, s) in zip(parts, summaries))
    half = t_quantile(level, dof) * se
    return Summary(n, estimate, se, estimate - half, estimate + half, level, dof, WELCH)


def holm(p_values: list[float], alpha: float = 1 - LEVEL) -> list[bool]:
    """Holm's step-down procedure: which of m hypotheses are rejected, with a family-wise error
    of at most `alpha`. The k-th smallest p-value is compared with alpha / (m − k + 1); the
    first that fails stops the procedure."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for k, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - k):
            break
        rejected[i] = True
    return rejected


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values: hypothesis i is rejected at level alpha when its value is <= alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def format_summary(s: Summary | None, digits: int = 2) -> str:
    """'7.45 ± 0.12 [7.20, 7.70]' (mean ± std [95 % CI]); one value: '7.45 (1 seed)'."""
    if s is None:
        return "-"
    if not s.has_interval:
        return f"{s.mean:.{digits}f} (1 seed)" if s.n == 1 else f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} [{s.low:.{digits}f}, {s.high:.{digits}f}]"


def format_difference(s: Summary | None, digits: int = 2) -> str:
    """'+1.20 [+0.40, +2.00]' (difference [95 % CI]); without an interval the signed value alone."""
    if s is None:
        return "-"
    if not s.has_interval:
        return f"{s.mean:+.{digits}f}"
    return f"{s.mean:+.{digits}f} [{s.low:+.{digits}f}, {s.high:+.{digits}f}]"
