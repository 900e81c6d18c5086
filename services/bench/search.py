"""Goodput search: the highest request rate at which a target share of requests meets both SLOs.

The paper finds goodput by raising the rate step by step; with a bounded number of runs we bracket it with an
exponential ramp (multiply the rate by `factor` while the target holds, divide while it does not), then
bisect between the highest passing and the lowest failing rate until they are within `tolerance` (relative)
of each other. The invariant: every rate at or below `low` that was tried passed, `high` failed; goodput is
`low`, the highest rate actually seen to pass (0 when none did). The search is a pure state machine —
`next_rate()` then `record(rate, attainment)` — so it can be driven by real runs or by a test function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GoodputSearch:
    target: float  # attainment needed, e.g. 0.9 for P90
    start_rate: float = 1.0
    factor: float = 2.0
    tolerance: float = 0.1  # stop when high − low ≤ tolerance · low
    max_runs: int = 12
    min_rate: float = 0.01  # stop descending below this: the server meets the target at no useful rate
    max_rate: float | None = None  # stop ascending above this: the server meets it everywhere we care about
    history: list[tuple[float, float]] = field(default_factory=list)
    low: float | None = None  # highest passing rate
    high: float | None = None  # lowest failing rate

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"target attainment must be in (0, 1], got {self.target}")
        if not self.start_rate > 0 or not self.factor > 1 or not self.tolerance > 0 or self.max_runs < 1:
            raise ValueError("need start_rate > 0, factor > 1, tolerance > 0 and max_runs >= 1")

    def next_rate(self) -> float | None:
        """The next rate to run, or None when the search is over."""
        if len(self.history) >= self.max_runs:
            return None
        if not self.history:
            return self.start_rate
        if self.high is None:  # everything passed so far: ramp up
            assert self.low is not None
            if self.max_rate is not None and self.low >= self.max_rate:
                return None
            rate = self.low * self.factor
            return rate if self.max_rate is None else min(rate, self.max_rate)
        if self.low is None:  # everything failed so far: ramp down
            rate = self.high / self.factor
            return rate if rate >= self.min_rate else None
        if self.high - self.low <= self.tolerance * self.low:
            return None
        return (self.low + self.high) / 2

    def record(self, rate: float, attainment: float) -> None:
        self.history.append((rate, attainment))
        if self.passed(attainment):
            self.low = rate if self.low is None else max(self.low, rate)
        else:
            self.high = rate if self.high is None else min(self.high, rate)

    def passed(self, attainment: float) -> bool:
        return attainment >= self.target

    @property
    def goodput(self) -> float:
        return self.low or 0.0

    @property
    def bracketed(self) -> bool:
        """Whether the goodput lies between a passing and a failing rate (else it is a bound)."""
        return self.low is not None and self.high is not None

    def describe(self) -> dict[str, Any]:
        return {
            "target_attainment": self.target,
            "start_rate": self.start_rate,
            "factor": self.factor,
            "tolerance": self.tolerance,
            "max_runs": self.max_runs,
            "min_rate": self.min_rate,
            "max_rate": self.max_rate,
            "runs": [
                {"rate": rate, "attainment": att, "passed": self.passed(att)} for rate, att in self.history
            ],
            "goodput_rps": self.goodput,
            "lowest_failing_rate": self.high,
            "bracketed": self.bracketed,
        }
