"""Instances' phases during a benchmark, read from their NATS status reports (`ecoserve bench --nats`).

Every ecoserve instance publishes an `InstanceStatus` after its engine steps and as a heartbeat
(`{prefix}.status.{id}`). The recorder subscribes to all of them while the benchmark runs and keeps, per
instance, only the reports whose phase or prefill window differ from the previous one: a run's timeline is
then a few transitions per second instead of a hundred reports. A record holds

    t               seconds from the run's start (the instance's report time, unix, minus the run's start)
    instance        instance id
    phase           what the latest engine step did: prefill | decode | mixed | idle (status.phase_of)
    prefill_window  PaDG: whether the coordinator has this instance's prefill window open; None otherwise
    epoch           the window epoch the instance last applied (0 before any)

FuDG prefill instances also publish a `KvTransferReport` per request they hand to a decode instance
(`{prefix}.fudg.transfers`); the book keeps those too, and `transfers_between` sums a run's (count, bytes,
transfer seconds).

Only used when asked for, so the benchmark still runs against any OpenAI server without NATS.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from shared import subjects
from shared.kv_messages import KvHandoffSkipped, KvTransferReport
from shared.messages import InstanceStatus
from shared.wire import WireError, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseRecord:
    time: float  # unix seconds, as reported by the instance
    instance: str
    phase: str
    prefill_window: bool | None
    epoch: int

    def key(self) -> tuple[str, bool | None]:
        return self.phase, self.prefill_window

    def relative(self, start: float) -> dict[str, Any]:
        return {
            "t": round(max(0.0, self.time - start), 4),
            "instance": self.instance,
            "phase": self.phase,
            "prefill_window": self.prefill_window,
            "epoch": self.epoch,
        }


class PhaseBook:
    """The transitions seen so far, per instance; pure, so tests can feed it reports directly."""

    def __init__(self) -> None:
        self.records: dict[str, list[PhaseRecord]] = {}
        self.latest: dict[str, InstanceStatus] = {}  # every instance's newest report (readiness checks)
        self.reports = 0
        self.dropped = 0  # undecodable payloads
        self.transfers: list[KvTransferReport] = []

    def add(self, status: InstanceStatus) -> None:
        self.reports += 1
        previous = self.latest.get(status.instance_id)
        if previous is not None and status.seq < previous.seq and status.time < previous.time:
            return  # out of order; a restarted instance also numbers from 0, but its time moves on
        self.latest[status.instance_id] = status
        record = PhaseRecord(
            status.time, status.instance_id, status.phase, status.prefill_window, status.window_epoch
        )
        own = self.records.setdefault(status.instance_id, [])
        if not own or own[-1].key() != record.key():
            own.append(record)

    def between(self, start: float, end: float) -> list[dict[str, Any]]:
        """The records of [start, end] relative to `start`, each instance's state at `start` included at 0."""
        out: list[dict[str, Any]] = []
        for own in self.records.values():
            before = [r for r in own if r.time <= start]
            inside = [r for r in own if start < r.time <= end]
            out.extend(r.relative(start) for r in ([before[-1]] if before else []) + inside)
        return sorted(out, key=lambda r: (r["t"], r["instance"]))

    def add_transfer(self, report: KvTransferReport) -> None:
        self.transfers.append(report)

    def transfers_between(self, start: float, end: float) -> dict[str, Any] | None:
        """What the KV transfers that ended in [start, end] cost (None: there were none, not FuDG)."""
        inside = [r for r in self.transfers if start <= r.time <= end]
        if not inside:
            return None
        seconds = sorted(r.transfer_seconds for r in inside)
        return {
            "count": len(inside),
            "refused": sum(not r.accepted for r in inside),
            "kv_bytes": sum(r.kv_bytes for r in inside),
            "wire_bytes": sum(r.wire_bytes for r in inside),
            "tokens": sum(r.num_tokens for r in inside),
            "seconds_mean": sum(seconds) / len(seconds),
            "seconds_p50": _quantile(seconds, 0.5),
            "seconds_p90": _quantile(seconds, 0.9),
        }

    def ready(self) -> set[str]:
        return {i for i, s in self.latest.items() if s.state == "ready"}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default) of a sorted, non-empty list."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class PhaseRecorder:
    """Subscribes to every instance's status subject under `prefix` on the NATS server at `url`."""

    def __init__(self, url: str, prefix: str = subjects.DEFAULT_PREFIX):
        self.url = url
        self.prefix = subjects.check_prefix(prefix)
        self.book = PhaseBook()
        self._nc: Any = None

    async def start(self, timeout: float = 5.0) -> None:
        import nats  # only with --nats: the plain benchmark needs no NATS client

        from services.infra.nats_sync import synced

        async def quiet(_: Exception) -> None:  # a failed connect is reported once, by the caller
            return None

        # nats-py keeps retrying an unreachable server unless told not to, and bounds nothing by itself.
        self._nc = await asyncio.wait_for(
            nats.connect(
                self.url,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                connect_timeout=timeout,
                error_cb=quiet,
            ),
            timeout,
        )
        await self._nc.subscribe(subjects.status_all(self.prefix), cb=self._on_message)
        await self._nc.subscribe(subjects.kv_transfers(self.prefix), cb=self._on_transfer)
        await synced(self._nc)  # the subscription is live before the first request goes out

    async def _on_message(self, msg: Any) -> None:
        try:
            self.book.add(decode(msg.data, InstanceStatus))
        except WireError as exc:
            self.book.dropped += 1
            log.debug("dropped a status report on %s: %s", msg.subject, exc)

    async def _on_transfer(self, msg: Any) -> None:
        try:
            report = decode(msg.data, (KvTransferReport, KvHandoffSkipped))
        except WireError as exc:
            self.book.dropped += 1
            log.debug("dropped a KV transfer report: %s", exc)
            return
        if isinstance(report, KvTransferReport):  # a skipped hand-off moved nothing
            self.book.add_transfer(report)

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.drain()  # delivers what already arrived, then closes
            self._nc = None

    async def __aenter__(self) -> PhaseRecorder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
