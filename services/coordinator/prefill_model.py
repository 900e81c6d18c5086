"""The prefill-time predictor: how long an instance needs to prefill a prompt of n tokens, from the profile
the instance measured at start-up (prompt length → seconds). Pure.

Two rules:
- "interpolate" (default): piecewise linear between profiled points. Below the first point the first point's
  time is used, because a forward pass never gets cheaper than the smallest one measured (reading the weights
  dominates short prompts); beyond the last point the last segment's slope continues (attention's quadratic
  term is small next to the linear one at the lengths an SLO allows).
- "authors": what EcoServe's official code does (research/ecoserve.md §4): below 16 tokens t16·n/16; the exact
  entry when the length was profiled; otherwise linear scaling from the 4096-token point, t4096·n/4096. It
  needs points at 16 and 4096 tokens. Kept so the two can be compared; it ignores every other point.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Iterable
from typing import Literal

PrefillRule = Literal["interpolate", "authors"]
RULES: tuple[PrefillRule, ...] = ("interpolate", "authors")
AUTHORS_SMALL = 16  # below this the authors scale the 16-token time down
AUTHORS_ANCHOR = 4096  # unprofiled lengths scale linearly from this point


class ProfileError(ValueError):
    """The profile cannot be used for predictions; the message says what is wrong with it."""


class PrefillModel:
    """Predicts prefill seconds for a prompt length. Immutable once built."""

    __slots__ = ("_exact", "_lengths", "_times", "rule")

    def __init__(self, points: Iterable[tuple[int, float]], rule: PrefillRule = "interpolate"):
        profile = [(_length(length), _seconds(length, seconds)) for length, seconds in points]
        _validate(profile, rule)
        self.rule: PrefillRule = rule
        self._lengths = [length for length, _ in profile]
        # A longer prompt measured faster than a shorter one is timing noise (the instance profiler does not
        # smooth it); predicting with it would favour long prompts, so times are flattened to a running max.
        self._times = list(itertools.accumulate((seconds for _, seconds in profile), max))
        self._exact = dict(zip(self._lengths, self._times, strict=True))

    @property
    def points(self) -> list[tuple[int, float]]:
        return list(zip(self._lengths, self._times, strict=True))

    def predict(self, prompt_tokens: int) -> float:
        """Predicted prefill seconds for a prompt of `prompt_tokens` tokens (at least 1)."""
        if prompt_tokens < 1:
            raise ValueError(f"prompt length must be at least 1 token, got {prompt_tokens}")
        if self.rule == "authors":
            return self._authors(prompt_tokens)
        return self._interpolate(prompt_tokens)

    def _interpolate(self, n: int) -> float:
        lengths, times = self._lengths, self._times
        if n <= lengths[0]:
            return times[0]
        if len(lengths) == 1:
            return times[0] * n / lengths[0]  # one point: proportional beyond it
        i = bisect.bisect_left(lengths, n)
        if i == len(lengths):  # beyond the last point: continue the last segment
            i -= 1
        (x0, y0), (x1, y1) = (lengths[i - 1], times[i - 1]), (lengths[i], times[i])
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def _authors(self, n: int) -> float:
        if n < AUTHORS_SMALL:
            return self._exact[AUTHORS_SMALL] * n / AUTHORS_SMALL
        exact = self._exact.get(n)
        if exact is not None:
            return exact
        return self._exact[AUTHORS_ANCHOR] * n / AUTHORS_ANCHOR

    def __repr__(self) -> str:
        return f"PrefillModel({self.points!r}, rule={self.rule!r})"


def _length(value: object) -> int:
    try:
        length = operator.index(value)  # ints of any kind (numpy's too), never floats or bools
    except TypeError:
        raise ProfileError(f"prompt length must be an integer, got {value!r}") from None
    if isinstance(value, bool) or length < 1:
        raise ProfileError(f"prompt length must be a positive integer, got {value!r}")
    return length


def _seconds(length: object, value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ProfileError(f"prefill time at {length} tokens must be a number, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ProfileError(f"prefill time at {length} tokens must be a finite number >= 0, got {value!r}")
    return seconds


def _validate(profile: list[tuple[int, float]], rule: str) -> None:
    if rule not in RULES:
        raise ProfileError(f"unknown prefill rule {rule!r} (known: {', '.join(RULES)})")
    if not profile:
        raise ProfileError("the prefill profile is empty: at least one (length, seconds) point is needed")
    lengths = [length for length, _ in profile]
    for shorter, longer in itertools.pairwise(lengths):
        if longer <= shorter:
            raise ProfileError(f"profile lengths must be strictly increasing: {longer} follows {shorter}")
    if rule == "authors":
        missing = [str(n) for n in (AUTHORS_SMALL, AUTHORS_ANCHOR) if n not in lengths]
        if missing:
            raise ProfileError(f"the authors' rule needs profiled points at {' and '.join(missing)} tokens")
