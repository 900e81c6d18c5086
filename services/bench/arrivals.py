"""Arrival schedules: when each request of a run is sent, as `vllm bench serve` does it.

Inter-arrival gaps are i.i.d. Gamma(shape = b, scale = 1 / (R·b)) for burstiness b at mean rate R: b = 1 is a
Poisson process (exponential gaps), b < 1 burstier, b > 1 smoother (the coefficient of variation of the gaps
is 1/√b, so the paper's bursty runs with CV 1.2, 1.5, 2.0 are b ≈ 0.69, 0.44, 0.25); b = inf spaces requests
evenly. The cumulative schedule is then rescaled so the last request goes out at exactly n/R, which removes
the percent-level drift of the realised rate between seeds.

The gaps are drawn at unit rate and divided by R, so one seed gives the same shape of schedule at every rate
(common random numbers across the runs of a rate search).
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start of the run, non-decreasing, n of them."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n  # everything at once
    if math.isinf(burstiness):
        gaps = np.ones(n)
    else:
        rng = np.random.default_rng([seed, 0xA7])
        gaps = rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=n)
    times = np.cumsum(gaps)
    times *= (n / rate) / times[-1]
    return [float(t) for t in times]


def request_count(
    rate: float, duration: float | None, num_requests: int | None, min_requests: int = 1
) -> int:
    """Requests in a run: --num-requests if given, else rate × duration (at least min_requests)."""
    if num_requests is not None:
        return num_requests
    if duration is None or math.isinf(rate):
        raise ValueError("give --num-requests, or --duration with a finite rate")
    return max(min_requests, round(rate * duration))
