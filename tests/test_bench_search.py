"""Goodput search against synthetic attainment functions with known thresholds: found within tolerance, in
a bounded number of runs, from above or below, and reported honestly when it cannot be bracketed."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from services.bench.search import GoodputSearch


def drive(search: GoodputSearch, attainment: Callable[[float], float]) -> list[float]:
    rates = []
    while (rate := search.next_rate()) is not None:
        rates.append(rate)
        search.record(rate, attainment(rate))
    return rates


def step(threshold: float) -> Callable[[float], float]:
    return lambda rate: 1.0 if rate <= threshold else 0.5


@pytest.mark.parametrize("start", [0.3, 1.0, 3.7, 50.0])
def test_finds_a_step_threshold_within_tolerance(start):
    search = GoodputSearch(target=0.9, start_rate=start, tolerance=0.05, max_runs=20)
    rates = drive(search, step(3.7))
    assert search.bracketed
    assert 3.7 * (1 - 0.05) <= search.goodput <= 3.7
    assert search.high is not None and search.high > 3.7
    assert len(rates) <= 12  # a ramp of a few doublings, then a few halvings of the bracket
    assert len(set(rates)) == len(rates)  # never runs the same rate twice


def test_smooth_attainment_curve_and_target_share():
    # Attainment falls smoothly with load; P99 holds below a lower rate than P50.
    curve = lambda rate: 1 / (1 + math.exp(2.0 * (rate - 8.0)))  # noqa: E731 - a test curve
    found = {}
    for target in (0.5, 0.9, 0.99):
        search = GoodputSearch(target=target, start_rate=1.0, tolerance=0.02, max_runs=20)
        drive(search, curve)
        exact = 8.0 + math.log(1 / target - 1) / 2.0  # where the curve crosses the target
        assert exact * 0.98 <= search.goodput <= exact
        found[target] = search.goodput
    assert found[0.99] < found[0.9] < found[0.5]


def test_run_budget_is_respected_and_the_best_pass_so_far_reported():
    search = GoodputSearch(target=0.9, start_rate=1.0, max_runs=3)
    assert drive(search, step(100.0)) == [1.0, 2.0, 4.0]
    assert search.goodput == 4.0 and not search.bracketed


def test_no_rate_meets_the_target():
    search = GoodputSearch(target=0.9, start_rate=1.0, min_rate=0.1, max_runs=50)
    rates = drive(search, lambda rate: 0.0)
    assert search.goodput == 0.0 and not search.bracketed
    assert min(rates) >= 0.1 and len(rates) == 4  # 1, 0.5, 0.25, 0.125; the next would be below min_rate


def test_max_rate_caps_the_ramp():
    search = GoodputSearch(target=0.9, start_rate=1.0, max_rate=5.0, max_runs=50)
    assert drive(search, step(100.0)) == [1.0, 2.0, 4.0, 5.0]
    assert search.goodput == 5.0 and not search.bracketed


def test_describe_lists_every_run():
    search = GoodputSearch(target=0.9, start_rate=2.0, tolerance=0.2)
    drive(search, step(3.0))
    described = search.describe()
    assert [r["rate"] for r in described["runs"]] == [rate for rate, _ in search.history]
    assert [r["passed"] for r in described["runs"]] == [rate <= 3.0 for rate, _ in search.history]
    assert described["goodput_rps"] == search.goodput and described["lowest_failing_rate"] == search.high


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        GoodputSearch(target=0.0)
    with pytest.raises(ValueError):
        GoodputSearch(target=0.9, factor=1.0)
