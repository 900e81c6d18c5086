"""Which cores each process of `ecoserve up` runs on.

Every instance gets cores of its own; the control plane (NATS, Redis, the coordinator and the router) gets the
cores left over, so its bursts after every engine step (a token message to route, SSE writes, a status report)
never preempt an engine. On the 2-core development box, one 1-thread instance of the tiny model kept ~0.91 of
its in-process throughput unpinned and ~1.0 with this plan (docs/benchmarks.md). Pure: the caller passes the
cores this process may use (`os.sched_getaffinity(0)`).

Modes: `auto` pins only when every instance thread can have a core of its own; `on` pins regardless (cores
are shared round-robin when there are too few); `off` leaves placement to the OS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PIN_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CorePlan:
    instances: tuple[frozenset[int] | None, ...]  # per instance, in start order (None: unpinned)
    control: frozenset[int] | None  # NATS, Redis, coordinator, router (None: unpinned)


def plan_cores(available: Iterable[int], instances: int, threads: int, mode: str) -> CorePlan:
    if mode not in PIN_MODES:
        raise ValueError(f"pin mode must be one of {', '.join(PIN_MODES)}, got {mode!r}")
    if instances < 1 or threads < 1:
        raise ValueError(f"need at least one instance and one thread, got {instances} × {threads}")
    cores = sorted(set(available))
    unpinned = CorePlan(instances=(None,) * instances, control=None)
    if mode == "off" or not cores or (mode == "auto" and instances * threads > len(cores)):
        return unpinned
    per_instance = tuple(
        frozenset(cores[(i * threads + k) % len(cores)] for k in range(threads)) for i in range(instances)
    )
    rest = frozenset(cores).difference(*per_instance)
    return CorePlan(instances=per_instance, control=rest or None)


def pin_mode(value: str) -> str:
    """A --pin-cores / ECOSERVE_PIN_CORES value: auto, on or off (1/true/yes and 0/false/no are accepted)."""
    text = value.strip().lower()
    text = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(text, text)
    if text not in PIN_MODES:
        raise ValueError(f"pin mode must be one of {', '.join(PIN_MODES)}, got {value!r}")
    return text
