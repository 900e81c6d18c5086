"""Arrival schedules (pure): the configured mean rate, the Gamma burstiness seen in the coefficient of
variation of the gaps, seeded reproducibility, and one schedule shape scaled across rates."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from services.bench.arrivals import arrival_times, request_count


def gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray([0.0, *times]))


def cv(times: list[float]) -> float:
    g = gaps(times)
    return float(g.std() / g.mean())


def test_poisson_has_the_mean_rate_and_exponential_gaps():
    times = arrival_times(20_000, rate=5.0, burstiness=1.0, seed=1)
    assert times[-1] == pytest.approx(20_000 / 5.0)  # rescaled: the last send at exactly n / R
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert float(gaps(times).mean()) == pytest.approx(0.2, rel=1e-9)
    assert cv(times) == pytest.approx(1.0, abs=0.04)
    # Exponential: P(gap > mean) = e^-1.
    assert float((gaps(times) > 0.2).mean()) == pytest.approx(math.exp(-1), abs=0.02)


@pytest.mark.parametrize("burstiness", [0.25, 0.44, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(burstiness):
    times = arrival_times(20_000, rate=2.0, burstiness=burstiness, seed=2)
    assert cv(times) == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)
    assert float(gaps(times).mean()) == pytest.approx(0.5, rel=1e-9)


def test_infinite_burstiness_is_even_spacing_and_infinite_rate_all_at_once():
    assert arrival_times(4, rate=2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert arrival_times(3, rate=math.inf) == [0.0, 0.0, 0.0]
    assert arrival_times(0, rate=1.0) == []


def test_seeded_and_the_same_shape_at_every_rate():
    a = arrival_times(100, rate=1.0, burstiness=0.5, seed=9)
    assert a == arrival_times(100, rate=1.0, burstiness=0.5, seed=9)
    assert a != arrival_times(100, rate=1.0, burstiness=0.5, seed=10)
    assert arrival_times(100, rate=4.0, burstiness=0.5, seed=9) == pytest.approx([t / 4 for t in a])


def test_invalid_parameters_are_rejected():
    for kwargs in ({"rate": 0.0}, {"rate": 1.0, "burstiness": 0.0}):
        with pytest.raises(ValueError):
            arrival_times(5, **kwargs)


def test_request_count():
    assert request_count(2.0, 10.0, None) == 20
    assert request_count(0.1, 10.0, None, min_requests=5) == 5
    assert request_count(2.0, 10.0, 7) == 7
    with pytest.raises(ValueError):
        request_count(math.inf, 10.0, None)
