"""Uncertainty over seeds: mean, standard deviation and Student-t confidence intervals.

A study point has one result per seed. With n >= 2 seeds the interval for the mean is
mean ± t(n-1) · std / √n; for a difference of two points (BN − GN, say) it is Welch's
interval, which does not assume equal spreads. With one seed there is no interval: callers
must say so rather than print a number that looks precise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as _scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float                      # sample standard deviation (n - 1); 0 for one value
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
    half = _scipy_stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, level)


def difference(a, b, level: float = LEVEL) -> Summary | None:
    """mean(a) − mean(b) with Welch's t-interval; no interval unless both have 2+ values."""
    sa, sb = summarize(a, level), summarize(b, level)
    if sa is None or sb is None:
        return None
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Summary(min(sa.n, sb.n), diff, float("nan"), level=level)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Summary(min(sa.n, sb.n), diff, 0.0, diff, diff, level)
    dof = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))  # Welch-Satterthwaite
    half = _scipy_stats.t.ppf(0.5 + level / 2, dof) * se
    return Summary(min(sa.n, sb.n), diff, se, diff - half, diff + half, level)


def format_summary(s: Summary | None, digits: int = 2) -> str:
    """'7.45 ± 0.12 [7.20, 7.70]' (mean ± std [95 % CI]); one value: '7.45 (1 seed)'."""
    if s is None:
        return "-"
    if not s.has_interval:
        return f"{s.mean:.{digits}f} (1 seed)" if s.n == 1 else f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} [{s.low:.{digits}f}, {s.high:.{digits}f}]"
