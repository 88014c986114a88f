"""Claim verdict logic on synthetic measurements (issue 8)."""

import pytest

from depthlab.experiments import verdict as V


def test_compare_holds_fails_inconclusive():
    # clear rise with small seed spread
    assert V.compare([1.0, 1.02], [2.0, 2.03], 1).status == V.HOLDS
    assert V.compare([1.0, 1.02], [2.0, 2.03], -1).status == V.FAILS
    # difference smaller than twice the standard error of the difference
    v = V.compare([1.0, 1.5], [1.2, 1.7], 1)
    assert v.status == V.INCONCLUSIVE and v.threshold > abs(v.effect)


def test_ties_of_a_discrete_metric_are_inconclusive():
    # usefulness 0 everywhere: no spread, no effect -> not a "holds"
    assert V.compare([0.0, 0.0], [0.0, 0.0], 1).status == V.INCONCLUSIVE
    # zero spread but a real change still needs the relative floor
    assert V.compare([1.0, 1.0], [1.005, 1.005], 1).status == V.INCONCLUSIVE
    assert V.compare([1.0, 1.0], [1.05, 1.05], 1).status == V.HOLDS


def test_single_seed_needs_a_ten_percent_effect():
    assert V.compare([1.0], [1.05], 1).status == V.INCONCLUSIVE
    v = V.compare([1.0], [1.2], 1)
    assert v.status == V.HOLDS and "1 seed" in v.detail


def test_trend_uses_endpoints_and_pooled_spread():
    groups = [[1.0, 1.1], [2.0, 2.1], [1.8, 1.9], [4.0, 4.1]]
    v = V.trend(groups, 1)
    assert v.status == V.HOLDS
    assert "2/3 steps" in v.detail
    assert V.trend(groups, -1).status == V.FAILS


def test_interior_optimum():
    v, best = V.interior_optimum([[10.0, 10.1], [9.0, 9.1], [10.5, 10.4]], minimize=True)
    assert (v.status, best) == (V.HOLDS, 1)
    v, best = V.interior_optimum([[8.0, 8.1], [9.0, 9.1], [10.5, 10.4]], minimize=True)
    assert (v.status, best) == (V.FAILS, 0)
    v, _ = V.interior_optimum([[10.0, 10.5], [9.9, 10.4], [10.1, 10.6]], minimize=True)
    assert v.status == V.INCONCLUSIVE


def test_not_worse_and_combine():
    assert V.not_worse([10.0, 10.1], [10.05, 10.12]).status == V.HOLDS
    assert V.not_worse([10.0, 10.1], [12.0, 12.1]).status == V.FAILS
    assert V.not_worse([0.5, 0.5], [0.4, 0.4], lower_is_better=False).status == V.FAILS
    h = V.Verdict(V.HOLDS, 1, 0, "", 2)
    f = V.Verdict(V.FAILS, 1, 0, "", 2)
    i = V.Verdict(V.INCONCLUSIVE, 0, 1, "", 2)
    assert V.combine([h, h]) == V.HOLDS
    assert V.combine([h, i]) == V.INCONCLUSIVE
    assert V.combine([h, i, f]) == V.FAILS


def test_bad_input():
    with pytest.raises(ValueError):
        V.compare([], [1.0], 1)
    with pytest.raises(ValueError):
        V.compare([1.0], [float("nan")], 1)
    with pytest.raises(ValueError):
        V.interior_optimum([[1.0], [2.0]])


def test_t_critical_matches_student_t():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 8, 12, 30, 31, 45, 60, 120, 1000):
        assert V.t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), abs=3e-3)
    with pytest.raises(ValueError):
        V.t_critical(0)


def test_threshold_uses_the_t_quantile_of_the_pooled_degrees_of_freedom():
    a, b = [1.0, 1.2], [1.5, 1.7]  # sd 0.1414 pooled over df=2, se = sd
    se = 0.1414213562 * 1.0
    v = V.compare(a, b, 1)
    assert v.threshold == pytest.approx(4.303 * se, rel=1e-3)
    # 2 * se (0.28) would resolve this 0.5 effect; t(df=2) * se = 0.61 does not
    assert v.status == V.INCONCLUSIVE
    # more seeds, same spread -> more degrees of freedom, smaller t, resolved
    assert V.compare([1.0, 1.2, 1.0, 1.2], [1.5, 1.7, 1.5, 1.7], 1).status == V.HOLDS


def test_a_zero_reference_does_not_remove_the_floor():
    # one seed, usefulness 0 -> 0.0625: the floor is 10 % of the larger mean, not of 0
    v = V.compare([0.0], [0.0625], 1)
    assert v.threshold == pytest.approx(0.00625)
    assert v.status == V.HOLDS and "1 seed" in v.detail
    # the floor is symmetric: falling to 0 needs the same as rising from 0
    assert V.compare([0.0625], [0.0], -1).threshold == pytest.approx(0.00625)
    # before the fix the floor of a 0 reference was 0, so any change at all "resolved"
    assert V.compare([0.0], [1e-9], 1, min_rel=0.5).threshold > 0


def test_not_worse_with_one_seed_uses_the_stated_tolerance():
    assert V.not_worse([20.0], [20.3]).status == V.HOLDS  # 1.5 % worse
    assert V.not_worse([20.0], [21.9]).status == V.FAILS  # 9.5 % worse: beyond 2 %
