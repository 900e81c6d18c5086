"""Requests the coordinator dispatched and has not seen finish, so it can end their streams if their
instance dies. Pure: time (monotonic seconds) is an argument.

A request is forgotten once its instance's status reports stop listing it after having listed it (it
finished), when PENDING_REPORTS reports in a row never listed it (it finished between two reports), or when
it is older than `max_age` (a bound on memory; routers still end such streams on InstanceLost).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.coordinator.registry import PENDING_REPORTS
from shared.messages import InstanceStatus


@dataclass
class Inflight:
    request_id: str
    instance_id: str
    reply_subject: str
    prompt_tokens: int
    dispatched_at: float
    output_tokens: int = 0  # as last reported by the instance
    listed: bool = False
    misses: int = 0


class InflightTracker:
    def __init__(self, max_age: float = 3600.0):
        self.max_age = max_age
        self._by_instance: dict[str, dict[str, Inflight]] = {}

    def __len__(self) -> int:
        return sum(len(requests) for requests in self._by_instance.values())

    def add(self, entry: Inflight) -> None:
        self._by_instance.setdefault(entry.instance_id, {})[entry.request_id] = entry

    def of(self, instance_id: str) -> list[Inflight]:
        return list(self._by_instance.get(instance_id, {}).values())

    def observe(self, status: InstanceStatus) -> None:
        """Update from one status report of `status.instance_id`."""
        requests = self._by_instance.get(status.instance_id)
        if not requests:
            return
        progress = {p.request_id: p for p in status.requests}
        for request_id, entry in list(requests.items()):
            reported = progress.get(request_id)
            if reported is not None:
                entry.listed = True
                entry.misses = 0
                entry.output_tokens = reported.output_tokens
                continue
            entry.misses += 1
            if entry.listed or entry.misses >= PENDING_REPORTS:
                del requests[request_id]
        if not requests:
            del self._by_instance[status.instance_id]

    def take_instance(self, instance_id: str) -> list[Inflight]:
        """Remove and return every request held by the instance (it is gone)."""
        return list(self._by_instance.pop(instance_id, {}).values())

    def prune(self, now: float) -> int:
        """Forget requests older than max_age; returns how many."""
        dropped = 0
        for instance_id, requests in list(self._by_instance.items()):
            for request_id, entry in list(requests.items()):
                if now - entry.dispatched_at > self.max_age:
                    del requests[request_id]
                    dropped += 1
            if not requests:
                del self._by_instance[instance_id]
        return dropped
