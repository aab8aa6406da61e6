"""Uncertainty over seeds: mean, standard deviation and Student-t confidence intervals.

A study point has one result per seed. With n >= 2 seeds the interval for the mean is
mean ± t(n-1) · std / √n; for a difference of two points (BN − GN, say) it is Welch's
interval, which does not assume equal spreads, and `contrast` extends it to any signed sum of
independent means (a difference of differences). With one seed there is no interval: callers
must say so rather than print a number that looks precise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.special import stdtrit  # Student t quantiles; scipy.special loads far faster than scipy.stats

LEVEL = 0.95


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

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def summarize(values, level: float = LEVEL) -> Summary | None:
    """Mean, std and the t-interval of the mean of `values` (finite numbers); None if empty."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
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
    """mean(a) − mean(b) with Welch's t-interval; no interval unless both have 2+ values."""
    return contrast([(1.0, a), (-1.0, b)], level)


def contrast(terms, level: float = LEVEL) -> Summary | None:
    """Σ c·mean(values) over independent groups, with a Welch-Satterthwaite t-interval.

    `terms` is a list of (coefficient, values). Two terms (+1, a), (−1, b) give Welch's
    difference; four give a difference of differences, e.g. how much BN − GN grows from batch
    32 to batch 2. No interval unless every group has 2+ values (std is then nan).
    """
    summaries = [(c, summarize(v, level)) for c, v in terms]
    if any(s is None for _, s in summaries):
        return None
    estimate = sum(c * s.mean for c, s in summaries)
    n = min(s.n for _, s in summaries)
    if n < 2:
        return Summary(n, estimate, float("nan"), level=level)
    parts = [c * c * s.std ** 2 / s.n for c, s in summaries]  # variance of each term's mean
    se = math.sqrt(sum(parts))
    if se == 0:
        return Summary(n, estimate, 0.0, estimate, estimate, level)
    dof = sum(parts) ** 2 / sum(v * v / (s.n - 1) for v, (_, s) in zip(parts, summaries))
    half = t_quantile(level, dof) * se
    return Summary(n, estimate, se, estimate - half, estimate + half, level)


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
