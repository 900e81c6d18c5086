"""Intra-instance scheduling policies: pure functions of the scheduler's queues and the current time.

- `nodg`: vLLM-style prefill first. A step is either prompts (whole, up to the token budget) or one token
  for every decoding sequence.
- `sarathi`: Sarathi-Serve's stall-free batching. Decodes first, then prefill chunks fill what is left of
  the token budget, so a long prompt never stalls running decodes for more than one budget's worth.
- `padg`: EcoServe's temporal disaggregation. The coordinator opens and closes this instance's prefill
  window (`set_prefill_active`); while it is open the instance runs `nodg` (prompts first, decodes pause),
  while it is closed it only decodes and new prompts wait for the next window.

A policy is chosen per engine (`make_policy`) and may be replaced between steps (`scheduler.policy = ...`):
every policy works from the queues alone, so whatever another policy left half done (a partly prefilled
prompt, a preempted sequence) is picked up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from services.instance.engine.scheduler import Policy, Scheduler, SchedulerOutput
from services.instance.engine.sequence import Sequence


class NoDGPolicy:
    name = "nodg"

    def schedule(self, scheduler: Scheduler, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        if scheduler.schedule_prefills(out, scheduler.config.max_num_batched_tokens, chunked=False):
            return out
        scheduler.schedule_decodes(out, scheduler.config.max_num_batched_tokens)
        return out


class SarathiPolicy:
    name = "sarathi"

    def schedule(self, scheduler: Scheduler, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = scheduler.config.max_num_batched_tokens
        used = scheduler.schedule_decodes(out, budget)
        scheduler.schedule_prefills(out, budget - used, chunked=True)
        return out


class PaDGPolicy:
    """Prefill only while the prefill window is open; otherwise decode only.

    Open window: whole prompts first, up to the token budget, like `nodg` (decodes pause); with nothing to
    prefill it decodes, so the instance never idles.

    Closed window: decodes, with three exceptions that are prefill work nonetheless:
    - a prompt already partly prefilled (longer than the step budget) is finished: it holds KV blocks;
    - a preempted sequence is recomputed: it is a running request that lost its KV, and parking it until the
      next window would stall its stream for a whole rolling cycle;
    - with `finish_admitted_prefills`, prompts that arrived before the window closed (or at most
      `admit_grace` seconds after) are still prefilled. The coordinator counted them against this window's
      TTFT budget; the grace covers a dispatch handled after the close message that was sent before it
      (they travel on different subjects, so their order is not guaranteed).
    Any other prompt arriving while the window is closed waits, untouched, for the next window; the
    coordinator normally sends prompts only to the instance whose window is open.

    Arrival times and `now` must come from the same clock (the engine's).
    """

    name = "padg"

    def __init__(
        self, *, activated: bool = False, finish_admitted_prefills: bool = True, admit_grace: float = 0.1
    ):
        if admit_grace < 0:
            raise ValueError(f"admit_grace must not be negative, got {admit_grace}")
        self.activated = activated
        self.finish_admitted_prefills = finish_admitted_prefills
        self.admit_grace = admit_grace
        self.switched_at: float | None = None  # the latest change of `activated`, either way
        self.window_opened_at: float | None = None
        self.window_closed_at: float | None = None
        self.num_switches = 0

    @property
    def phase(self) -> str:
        return "prefill" if self.activated else "decode"

    def set_prefill_active(self, active: bool, now: float) -> bool:
        """Open or close the prefill window at `now`; True when that changed the state. Repeating an open
        is a no-op, so a retried control message does not restart the window. Repeating a close moves the
        close time forward: when the open was lost, the prompts the coordinator sent for that window
        arrived before this close and must still be prefilled, not parked until a window that may never
        come."""
        if active == self.activated:
            if not active:
                self.window_closed_at = (
                    now if self.window_closed_at is None else max(self.window_closed_at, now)
                )
            return False
        self.activated = active
        self.switched_at = now
        self.num_switches += 1
        if active:
            self.window_opened_at = now
        else:
            self.window_closed_at = now
        return True

    def schedule(self, scheduler: Scheduler, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = scheduler.config.max_num_batched_tokens
        if self.activated:
            prefilled = scheduler.schedule_prefills(out, budget, chunked=False)
        else:
            prefilled = _prefill_only(scheduler, out, budget, self._resumable_when_closed)
        if not prefilled:
            scheduler.schedule_decodes(out, budget)
        return out

    def _resumable_when_closed(self, seq: Sequence) -> bool:
        if seq.num_preemptions > 0:
            return True
        closed = self.window_closed_at
        return (
            self.finish_admitted_prefills
            and closed is not None
            and seq.arrival_time <= closed + self.admit_grace
        )


def _prefill_only(
    scheduler: Scheduler, out: SchedulerOutput, budget: int, eligible: Callable[[Sequence], bool]
) -> int:
    """`schedule_prefills` over the waiting sequences `eligible` accepts. The others keep their relative
    order behind the eligible ones left over (and behind any sequence preempted meanwhile)."""
    held = [s for s in scheduler.waiting if not eligible(s)]
    scheduler.waiting = deque(s for s in scheduler.waiting if eligible(s))
    try:
        return scheduler.schedule_prefills(out, budget, chunked=False)
    finally:
        scheduler.waiting.extend(held)


POLICIES: dict[str, Callable[..., Policy]] = {p.name: p for p in (NoDGPolicy, SarathiPolicy, PaDGPolicy)}


def make_policy(name: str, **options: object) -> Policy:
    """A new policy object by name; `options` go to its constructor (e.g. `padg`'s `activated=True`)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(**options)
