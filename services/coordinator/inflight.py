"""Requests the coordinator dispatched and has not seen finish, so it can end their streams if their
instance dies. Pure: time (monotonic seconds) is an argument.

A request is forgotten once its instance's status reports stop listing it after having listed it (it
finished), when PENDING_REPORTS reports in a row never listed it (it finished between two reports), or when
it is older than `max_age` (a bound on memory; routers still end such streams on InstanceLost).

FuDG records a request under both instances it runs on, each entry naming the other as `partner`. The decode
instance's entry is `awaiting_kv` until that instance lists the request: its absence from reports means the
KV has not arrived, not that the request finished. It stops waiting when the transfer is reported accepted
(dropped when refused: the prefill instance kept the request), or KV_GRACE seconds after the prefill instance
let go of the request without a report (it finished at its first token, or the transfer failed).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.coordinator.registry import PENDING_REPORTS
from shared.messages import InstanceStatus

# Longer than the prefill role waits for a decode instance's ack (services/instance/fudg.py, 30 s).
KV_GRACE = 40.0


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
    partner: str | None = None  # FuDG: the other instance holding an entry for this request
    awaiting_kv: bool = False  # FuDG decode entry: the KV is not here yet (see the module docstring)
    released_at: float | None = None  # FuDG decode entry: when the prefill instance stopped listing it


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

    def get(self, instance_id: str, request_id: str) -> Inflight | None:
        return self._by_instance.get(instance_id, {}).get(request_id)

    def discard(self, instance_id: str, request_id: str) -> Inflight | None:
        """Forget one entry (a dispatch that was not taken); the entry, if there was one."""
        requests = self._by_instance.get(instance_id)
        if requests is None:
            return None
        entry = requests.pop(request_id, None)
        if not requests:
            del self._by_instance[instance_id]
        return entry

    def observe(self, status: InstanceStatus, now: float) -> None:
        """Update from one status report of `status.instance_id`, received at `now`."""
        requests = self._by_instance.get(status.instance_id)
        if not requests:
            return
        progress = {p.request_id: p for p in status.requests}
        for request_id, entry in list(requests.items()):
            reported = progress.get(request_id)
            if reported is not None:
                entry.listed = True
                entry.awaiting_kv = False
                entry.misses = 0
                entry.output_tokens = reported.output_tokens
                continue
            if entry.awaiting_kv:
                if entry.released_at is None or now - entry.released_at <= KV_GRACE:
                    continue
                entry.awaiting_kv = False
            entry.misses += 1
            if entry.listed or entry.misses >= PENDING_REPORTS:
                del requests[request_id]
                self._released(entry, now)
        if not requests:
            del self._by_instance[status.instance_id]

    def _released(self, entry: Inflight, now: float) -> None:
        """`entry`'s instance no longer holds the request: a decode partner's grace period starts."""
        partner = self.get(entry.partner, entry.request_id) if entry.partner else None
        if partner is not None and partner.awaiting_kv and partner.released_at is None:
            partner.released_at = now

    def transfer_done(self, request_id: str, decode_instance_id: str, accepted: bool) -> None:
        """A FuDG KV transfer was reported: the decode instance holds the request now, or (refused) never
        will."""
        entry = self.get(decode_instance_id, request_id)
        if entry is None:
            return
        if accepted:
            entry.awaiting_kv = False
        else:
            self.discard(decode_instance_id, request_id)

    def take_instance(self, instance_id: str) -> list[Inflight]:
        """Remove and return every request held by the instance (it is gone), dropping their FuDG partners'
        entries too (the caller ends each stream once)."""
        entries = list(self._by_instance.pop(instance_id, {}).values())
        for entry in entries:
            if entry.partner is not None:
                self.discard(entry.partner, entry.request_id)
        return entries

    def take_partnered(self, instance_id: str) -> list[Inflight]:
        """Remove and return the entries whose FuDG partner is the instance (after `take_instance`, for a
        lost prefill instance: the requests it had already handed to decode instances)."""
        taken = []
        for holder, requests in list(self._by_instance.items()):
            for request_id, entry in list(requests.items()):
                if entry.partner == instance_id:
                    taken.append(entry)
                    del requests[request_id]
            if not requests:
                del self._by_instance[holder]
        return taken

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
