"""The instance registry: who is registered, in which macro instance and in what order, how loaded each one
is, and whose lease has run out. Pure: the current time (monotonic seconds) is always an argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from services.coordinator.dispatch import Candidate
from shared.messages import InstanceInfo, InstanceStatus

DEFAULT_MACRO_INSTANCE = "m0"
PENDING_REPORTS = 3  # a dispatched request absent from this many reports in a row has finished already

AdminState = Literal["ready", "draining"]
Joined = Literal["new", "known", "restarted"]  # what a registration was: first, repeated, or a new process


class UnknownInstance(KeyError):
    """No instance with this id is registered."""

    def __init__(self, instance_id: str):
        super().__init__(instance_id)
        self.instance_id = instance_id

    def __str__(self) -> str:
        return f"unknown instance {self.instance_id!r}"


@dataclass
class InstanceRecord:
    info: InstanceInfo
    macro_instance_id: str
    state: AdminState  # the operator's intent; the instance's own view is status.state
    last_heartbeat: float
    # False for records reloaded from Redis until the instance is heard from again: a coordinator that just
    # took over must not dispatch to an instance that may have died while nobody was watching.
    confirmed: bool = True
    status: InstanceStatus | None = None
    # request_id → reports received since the dispatch that did not list it. Counted as load until a report
    # lists it, so a burst of submits between two reports is not all sent to the same instance.
    pending: dict[str, int] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def dispatchable(self) -> bool:
        reported_ready = self.status is None or self.status.state == "ready"
        return self.state == "ready" and self.confirmed and reported_ready

    def candidate(self) -> Candidate:
        status = self.status
        return Candidate(
            instance_id=self.instance_id,
            ready=self.dispatchable,
            num_running=status.num_running if status else 0,
            num_waiting=status.num_waiting if status else 0,
            outstanding=len(self.pending),
            kv_blocks_free=status.kv_blocks_free if status else self.info.kv_blocks_total,
        )


class Registry:
    """Instance records plus each macro instance's member order (the order rolling activation follows)."""

    def __init__(self, lease_seconds: float):
        self.lease_seconds = lease_seconds
        self._records: dict[str, InstanceRecord] = {}
        self._members: dict[str, list[str]] = {}

    # ---- queries ----

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[InstanceRecord]:
        """Records grouped by macro instance, each group in member order."""
        for members in self._members.values():
            for instance_id in members:
                yield self._records[instance_id]

    def get(self, instance_id: str) -> InstanceRecord:
        try:
            return self._records[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    def macro_instances(self) -> list[str]:
        return list(self._members)

    def members(self, macro_instance_id: str) -> list[str]:
        return list(self._members.get(macro_instance_id, ()))

    def candidates(self, macro_instance_id: str) -> list[Candidate]:
        return [self._records[i].candidate() for i in self._members.get(macro_instance_id, ())]

    # ---- membership ----

    def register(
        self, info: InstanceInfo, macro_instance_id: str, now: float
    ) -> tuple[InstanceRecord, Joined]:
        """Add an instance at the end of its macro instance's order, or refresh a known one (which keeps
        its place, macro instance and admin state; a new process under the same id starts with no load)."""
        record = self._records.get(info.instance_id)
        if record is None:
            record = InstanceRecord(
                info=info, macro_instance_id=macro_instance_id, state="ready", last_heartbeat=now
            )
            self._add(record)
            return record, "new"
        restarted = (record.info.pid, record.info.started_at) != (info.pid, info.started_at)
        record.info = info
        record.last_heartbeat = now
        record.confirmed = True
        if restarted:
            record.status = None
            record.pending.clear()
        return record, "restarted" if restarted else "known"

    def restore(self, info: InstanceInfo, macro_instance_id: str, state: AdminState, now: float) -> None:
        """Reload a persisted instance (call in member order). Its lease starts now, but it gets no
        requests until it reports again."""
        record = InstanceRecord(
            info=info,
            macro_instance_id=macro_instance_id,
            state=state,
            last_heartbeat=now,
            confirmed=False,
        )
        self._records.pop(info.instance_id, None)
        self._add(record)

    def _add(self, record: InstanceRecord) -> None:
        self._records[record.instance_id] = record
        members = self._members.setdefault(record.macro_instance_id, [])
        if record.instance_id not in members:
            members.append(record.instance_id)

    def remove(self, instance_id: str) -> InstanceRecord:
        record = self.get(instance_id)
        del self._records[instance_id]
        members = self._members[record.macro_instance_id]
        members.remove(instance_id)
        if not members:
            del self._members[record.macro_instance_id]
        return record

    def move(self, instance_id: str, macro_instance_id: str) -> InstanceRecord:
        """Put a member at the end of another macro instance's order (mitosis moves only control)."""
        record = self.get(instance_id)
        if record.macro_instance_id == macro_instance_id:
            return record
        self.remove(instance_id)
        record.macro_instance_id = macro_instance_id
        self._add(record)
        return record

    def set_state(self, instance_id: str, state: AdminState) -> InstanceRecord:
        record = self.get(instance_id)
        record.state = state
        return record

    # ---- heartbeats, leases, load ----

    def heartbeat(self, status: InstanceStatus, now: float) -> InstanceRecord | None:
        """Record a status report; None when the instance is not registered."""
        record = self._records.get(status.instance_id)
        if record is None:
            return None
        record.status = status
        record.last_heartbeat = now
        record.confirmed = True
        if record.pending:
            listed = {progress.request_id for progress in status.requests}
            for request_id, misses in list(record.pending.items()):
                if request_id in listed or misses + 1 >= PENDING_REPORTS:
                    del record.pending[request_id]
                else:
                    record.pending[request_id] = misses + 1
        return record

    def expire(self, now: float) -> list[InstanceRecord]:
        """Remove and return every instance silent for longer than the lease."""
        expired = [r for r in self._records.values() if now - r.last_heartbeat > self.lease_seconds]
        for record in expired:
            self.remove(record.instance_id)
        return expired

    def note_dispatch(self, instance_id: str, request_id: str) -> None:
        """Count a request sent to the instance as load until its reports show it."""
        self.get(instance_id).pending[request_id] = 0

    def cancel_dispatch(self, instance_id: str, request_id: str) -> None:
        """The instance did not take the request after all."""
        record = self._records.get(instance_id)
        if record is not None:
            record.pending.pop(request_id, None)
