"""Intra-instance scheduling policies: pure functions of the scheduler's queues and the current time.

- `nodg`: vLLM-style prefill first. A step is either prompts (whole, up to the token budget) or one token
  for every decoding sequence.
- `sarathi`: Sarathi-Serve's stall-free batching. Decodes first, then prefill chunks fill what is left of
  the token budget, so a long prompt never stalls running decodes for more than one budget's worth.
"""

from __future__ import annotations

from services.instance.engine.scheduler import Scheduler, SchedulerOutput


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


POLICIES = {p.name: p for p in (NoDGPolicy, SarathiPolicy)}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None
