import math

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
