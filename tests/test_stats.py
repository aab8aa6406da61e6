import math
import statistics

import pytest

from normlab.stats import difference, format_summary, summarize


def test_interval_of_the_mean_uses_student_t():
    s = summarize([7.0, 7.5, 8.0])
    assert s.n == 3 and s.mean == pytest.approx(7.5) and s.std == pytest.approx(0.5)
    # t(0.975, 2) = 4.3027: half-width 4.3027 * 0.5 / sqrt(3)
    assert s.high - s.mean == pytest.approx(4.302653 * 0.5 / math.sqrt(3), rel=1e-5)
    assert s.low == pytest.approx(2 * s.mean - s.high)
    assert format_summary(s) == "7.50 ± 0.50 [6.26, 8.74]"


def test_one_seed_has_no_interval():
    s = summarize([9.1])
    assert s.n == 1 and not s.has_interval
    assert format_summary(s) == "9.10 (1 seed)"
    assert summarize([]) is None and summarize([float("nan")]) is None
    assert not difference([1.0], [2.0, 3.0]).has_interval


def test_welch_difference():
    a, b = [7.0, 7.2, 7.4, 7.1], [9.0, 9.6, 9.3]
    d = difference(a, b)
    assert d.mean == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert d.high < 0  # clearly separated: the interval excludes zero
    same = difference([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    assert same.low < 0 < same.high


def test_welch_interval_matches_scipys_t_test():
    from scipy import stats as scipy_stats
    a, b = [7.0, 7.2, 7.4, 7.1], [9.0, 9.6, 9.3]
    ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    d = difference(a, b)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_contrast_of_four_groups_is_a_difference_of_differences():
    from normlab.stats import contrast, format_difference
    bn_small, gn_small, bn_large, gn_large = [30.0, 32.0, 31.0], [25.0, 26.0], [20.0, 21.0], [24.0, 24.5, 23.5]
    c = contrast([(1, bn_small), (-1, gn_small), (-1, bn_large), (1, gn_large)])
    means = [sum(v) / len(v) for v in (bn_small, gn_small, bn_large, gn_large)]
    assert c.mean == pytest.approx(means[0] - means[1] - means[2] + means[3])
    parts = [statistics.variance(v) / len(v) for v in (bn_small, gn_small, bn_large, gn_large)]
    assert c.std == pytest.approx(math.sqrt(sum(parts)))
    dof = sum(parts) ** 2 / sum(p * p / (len(v) - 1) for p, v in
                                zip(parts, (bn_small, gn_small, bn_large, gn_large)))
    from scipy import stats as scipy_stats
    assert c.high - c.mean == pytest.approx(scipy_stats.t.ppf(0.975, dof) * c.std)
    assert c.low > 0 and format_difference(c).startswith("+")
    # two terms are exactly Welch's difference
    assert contrast([(1, bn_small), (-1, gn_large)]) == difference(bn_small, gn_large)
    # one group with a single value: no interval
    assert not contrast([(1, [1.0]), (-1, [2.0, 3.0])]).has_interval
    assert format_difference(difference([2.0], [1.0])) == "+1.00"


def test_half_width_in_standard_deviations():
    from normlab.stats import half_width
    s = summarize([1.0, 2.0, 4.0])
    assert s.high - s.mean == pytest.approx(half_width(3) * s.std)
    assert half_width(2) > half_width(3) > half_width(5) > 1.96 / math.sqrt(5)
