"""Building blocks of mitosis's scaling signals: a sliding time window of samples, and a condition that
must hold without a break for some time before it counts (hysteresis). Pure: time is an argument.
"""

from __future__ import annotations

import statistics
from collections import deque


class SampleWindow:
    """(time, value) samples of the last `span` seconds, ignoring those taken before `since` (set after a
    scaling action, so the signal only reflects the new configuration)."""

    def __init__(self, span: float):
        if span <= 0:
            raise ValueError(f"the window span must be positive, got {span}")
        self.span = span
        self.since = float("-inf")
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, at: float, value: float) -> None:
        self._samples.append((at, value))

    def restart(self, at: float) -> None:
        """Forget everything taken before `at`."""
        self.since = at
        self._samples.clear()

    def values(self, now: float) -> list[float]:
        horizon = max(now - self.span, self.since)
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        # Samples may arrive slightly out of order (reports from several instances): filter, not only pop.
        return [value for at, value in self._samples if horizon <= at <= now]

    def mean(self, now: float, min_samples: int) -> float | None:
        values = self.values(now)
        return statistics.fmean(values) if len(values) >= max(min_samples, 1) else None

    def median(self, now: float, min_samples: int) -> float | None:
        values = self.values(now)
        return statistics.median(values) if len(values) >= max(min_samples, 1) else None


class Sustained:
    """True once the condition has held at every update for at least `hold` seconds; any update where it
    does not hold starts the wait again, so a signal hovering around its threshold never fires."""

    def __init__(self, hold: float):
        if hold < 0:
            raise ValueError(f"the hold time must not be negative, got {hold}")
        self.hold = hold
        self.since: float | None = None

    def update(self, holds: bool, now: float) -> bool:
        if not holds:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.hold

    def reset(self) -> None:
        self.since = None
