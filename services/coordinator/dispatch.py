"""Dispatch policies: which instance of a macro instance gets the next request. Pure: no I/O, no clock.

A policy sees the macro instance's members as `Candidate`s, in membership (rolling) order, and returns a
`Decision`. `LeastLoaded` balances NoDG/Sarathi instances. PaDG's rolling activation keeps state between
requests (windows, activation), so it is not a `DispatchPolicy`: it is `padg.MacroInstanceDispatcher`,
driven by padg_dispatcher.py; the `dispatch_policy` configuration key picks between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    """One member of a macro instance as the dispatcher sees it."""

    instance_id: str
    ready: bool  # registered, not draining, and its last status (if any) says "ready"
    num_running: int
    num_waiting: int
    outstanding: int  # dispatched but not yet visible in the instance's status reports
    kv_blocks_free: int

    @property
    def queued(self) -> int:
        """Requests waiting to be scheduled, counting the ones the instance has not reported yet."""
        return self.num_waiting + self.outstanding

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting + self.outstanding


@dataclass(frozen=True, slots=True)
class Dispatch:
    instance_id: str


@dataclass(frozen=True, slots=True)
class Unavailable:
    """No ready instance at all (HTTP 503)."""

    message: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class Overloaded:
    """Every ready instance's queue is full (HTTP 429)."""

    message: str
    retry_after: float


Decision = Dispatch | Unavailable | Overloaded


class DispatchPolicy(Protocol):
    """Chooses an instance for one request; must not mutate the candidates or keep state between calls
    that the coordinator does not also hold (a restarted coordinator has to make the same choices)."""

    name: str

    def choose(self, candidates: Sequence[Candidate], *, max_waiting_per_instance: int) -> Decision: ...


@dataclass(frozen=True)
class LeastLoaded:
    """The ready instance with the fewest running + waiting + outstanding requests; ties go to the one with
    more free KV blocks, then to the smallest id (deterministic, so tests and replays agree)."""

    retry_after: float = 1.0
    name: str = "least_loaded"

    def choose(self, candidates: Sequence[Candidate], *, max_waiting_per_instance: int) -> Decision:
        ready = [c for c in candidates if c.ready]
        if not ready:
            return Unavailable("no ready instance", self.retry_after)
        open_ = [c for c in ready if c.queued < max_waiting_per_instance]
        if not open_:
            return Overloaded(
                f"all {len(ready)} ready instances have {max_waiting_per_instance} or more queued requests",
                self.retry_after,
            )
        best = min(open_, key=lambda c: (c.load, -c.kv_blocks_free, c.instance_id))
        return Dispatch(best.instance_id)


POLICIES: dict[str, Callable[[], DispatchPolicy]] = {"least_loaded": LeastLoaded}


def make_policy(name: str) -> DispatchPolicy:
    """The policy registered under `name` (KeyError names the known ones)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown dispatch policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None
    return factory()
