"""A read-only, briefly cached view of the instance table the coordinator keeps in Redis.

The router keeps no cluster state of its own: /health, the context length and the cluster gauges come from
here. What is read:
- `keys.instances(prefix)`: hash instance_id → wire-encoded InstanceInfo;
- `keys.instance_lease(prefix, id)`: present while the instance is alive. Its value, when it is a
  wire-encoded InstanceStatus, gives the state and load; when it is a bare state name ("ready", "draining",
  …) it gives the state; any other value (the coordinator writes its own id) means "alive".
- `keys.macro_state(prefix, m)` for every m in `keys.macro_instances(prefix)`: the field
  `state:<instance_id>` = "draining" marks an instance an operator is draining (not ready to serve).
A snapshot is reused for `ttl` seconds (one Redis round trip per second at most, whatever the request rate)
and dropped early when a ClusterChanged broadcast arrives. The request path asks with `stale_ok`: an expired
snapshot is used at once while a background read refreshes it, so no request waits on Redis (~0.5 ms on
loopback) for a table that only changes with a broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.messages import InstanceInfo, InstanceState, InstanceStatus
from shared.wire import WireError, decode

log = logging.getLogger(__name__)

_STATES = frozenset(typing.get_args(InstanceState))
_ADMIN_STATE_FIELD = b"state:"  # in a macro instance's state hash: b"state:<instance_id>" -> b"draining"


@dataclass(frozen=True)
class InstanceView:
    info: InstanceInfo
    state: str  # "ready" unless the lease says otherwise
    status: InstanceStatus | None  # the latest status report, when the lease holds one


@dataclass(frozen=True)
class ClusterSnapshot:
    live: tuple[InstanceView, ...]  # registered instances whose lease has not expired
    registered: int
    error: str | None = None  # Redis could not be read

    @property
    def ready(self) -> tuple[InstanceView, ...]:
        return tuple(view for view in self.live if view.state == "ready")

    def max_model_len(self) -> int | None:
        """The smallest context length a live instance reports (any of them may get the request)."""
        lengths = [view.info.max_model_len for view in self.live if view.info.max_model_len > 0]
        return min(lengths) if lengths else None


def _lease_state(raw: bytes) -> tuple[str, InstanceStatus | None]:
    try:
        status = decode(raw, InstanceStatus)
    except WireError:
        text = raw.decode("utf-8", "replace").strip().lower()
        return (text if text in _STATES else "ready"), None
    return status.state, status


class ClusterView:
    def __init__(self, redis: aioredis.Redis, prefix: str, ttl: float = 1.0):
        self._redis = redis
        self._prefix = prefix
        self._ttl = ttl
        self._snapshot: ClusterSnapshot | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._generation = 0  # bumped by invalidate(): a read begun before it must not be cached
        self._refresh: asyncio.Task[ClusterSnapshot] | None = None

    def invalidate(self) -> None:
        self._snapshot = None
        self._generation += 1

    async def snapshot(self, *, stale_ok: bool = False) -> ClusterSnapshot:
        """The table, read at most once per `ttl`; with `stale_ok`, an expired (not invalidated) snapshot is
        returned at once and refreshed in the background."""
        if self._snapshot is not None and time.monotonic() - self._read_at < self._ttl:
            return self._snapshot
        if stale_ok and self._snapshot is not None:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._fresh(), name="ecoserve-cluster-refresh")
            return self._snapshot
        return await self._fresh()

    async def _fresh(self) -> ClusterSnapshot:
        async with self._lock:  # one read for all the requests that find the cache stale together
            snapshot = self._snapshot
            if snapshot is None or time.monotonic() - self._read_at >= self._ttl:
                generation = self._generation
                snapshot = await self._read()
                if generation == self._generation:
                    self._snapshot, self._read_at = snapshot, time.monotonic()
            return snapshot

    async def aclose(self) -> None:
        """Stop a background refresh (before the Redis client closes under it)."""
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh

    async def _read(self) -> ClusterSnapshot:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.instances(self._prefix))
                pipe.smembers(keys.macro_instances(self._prefix))
                table, macros = await pipe.execute()
            infos, lease_keys = [], []
            for instance_id, raw in table.items():
                try:
                    info = decode(raw, InstanceInfo)
                    lease_keys.append(keys.instance_lease(self._prefix, info.instance_id))
                except (WireError, ValueError) as error:
                    log.warning("skipping malformed instance entry %r in Redis: %s", instance_id, error)
                    continue
                infos.append(info)
            macro_keys = []
            for macro in macros:
                try:
                    macro_keys.append(keys.macro_state(self._prefix, macro.decode()))
                except (UnicodeDecodeError, ValueError):
                    log.warning("skipping malformed macro instance id %r in Redis", macro)
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in lease_keys:
                    pipe.get(key)
                for key in macro_keys:
                    pipe.hgetall(key)
                replies = await pipe.execute() if lease_keys or macro_keys else []
        except (RedisError, OSError) as error:
            return ClusterSnapshot(live=(), registered=0, error=f"{type(error).__name__}: {error}")
        leases, macro_states = replies[: len(lease_keys)], replies[len(lease_keys) :]
        draining = {
            name[len(_ADMIN_STATE_FIELD) :].decode("utf-8", "replace")
            for state in macro_states
            for name, value in state.items()
            if name.startswith(_ADMIN_STATE_FIELD) and value == b"draining"
        }
        live = []
        for info, lease in zip(infos, leases, strict=True):
            if lease is not None:
                state, status = _lease_state(lease)
                if info.instance_id in draining:
                    state = "draining"
                live.append(InstanceView(info=info, state=state, status=status))
        return ClusterSnapshot(live=tuple(live), registered=len(infos))
