"""Redis persistence of the coordinator's durable state (layout in shared/keys.py and docs/ARCHITECTURE.md).

- `keys.instances`: hash instance_id → InstanceInfo, msgpack via shared.wire (what routers may read).
- `keys.macro_instances`: set of macro instance ids.
- `keys.macro_members(m)`: list of instance ids in rolling order; an instance keeps its place when it
  registers again.
- `keys.macro_state(m)`: hash with `epoch` (bumped on every membership or state change, so readers can tell
  a stale cache) and `state:<instance_id>` → "ready" | "draining" (the operator's intent survives restarts).
- `keys.instance_lease(id)`: the coordinator id, with a TTL of the instance lease, refreshed from heartbeats.
- `keys.config`: hash of scheduling configuration, values as text (see scheduling_config.py).
Only the coordinator holding the macro instance's lease writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from services.coordinator.registry import DEFAULT_MACRO_INSTANCE, AdminState
from shared import keys
from shared.messages import InstanceInfo
from shared.wire import WireError, decode, encode

_STATE_FIELD = "state:"
_STATES: frozenset[str] = frozenset({"ready", "draining"})

# Append unless already a member: a re-registering instance keeps its place in the rolling order.
_PUSH_ABSENT = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
    return redis.call('RPUSH', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class StoredInstance:
    info: InstanceInfo
    macro_instance_id: str
    state: AdminState


@dataclass
class Snapshot:
    """Everything a coordinator resumes from; `problems` lists entries that could not be used."""

    instances: list[StoredInstance] = field(default_factory=list)  # grouped by macro, in member order
    config: dict[bytes, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Store:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis = redis
        self.prefix = prefix
        self._push_absent = redis.register_script(_PUSH_ABSENT)

    async def load(self) -> Snapshot:
        snapshot = Snapshot()
        raw_infos = cast(dict[bytes, bytes], await self.redis.hgetall(keys.instances(self.prefix)))
        infos: dict[str, InstanceInfo] = {}
        for raw_id, data in raw_infos.items():
            instance_id = raw_id.decode(errors="replace")
            try:
                infos[instance_id] = decode(data, InstanceInfo)
            except WireError as error:
                snapshot.problems.append(f"instance {instance_id!r}: {error}")
        macros = sorted(m.decode() for m in await self.redis.smembers(keys.macro_instances(self.prefix)))
        placed: set[str] = set()
        for macro in macros:
            raw_members = await self.redis.lrange(keys.macro_members(self.prefix, macro), 0, -1)
            members = [m.decode() for m in raw_members]
            state = cast(dict[bytes, bytes], await self.redis.hgetall(keys.macro_state(self.prefix, macro)))
            for instance_id in members:
                info = infos.get(instance_id)
                if info is None or instance_id in placed:
                    snapshot.problems.append(f"macro {macro!r}: member {instance_id!r} has no record")
                    continue
                stored = state.get(f"{_STATE_FIELD}{instance_id}".encode(), b"ready").decode()
                admin_state = cast(AdminState, stored if stored in _STATES else "ready")
                snapshot.instances.append(StoredInstance(info, macro, admin_state))
                placed.add(instance_id)
        # A record without a macro instance (a write cut short): give it the default one rather than lose it.
        for instance_id, info in infos.items():
            if instance_id not in placed:
                snapshot.instances.append(StoredInstance(info, DEFAULT_MACRO_INSTANCE, "ready"))
        snapshot.config = cast(dict[bytes, bytes], await self.redis.hgetall(keys.config(self.prefix)))
        return snapshot

    async def save_instance(self, info: InstanceInfo, macro_instance_id: str, state: AdminState) -> None:
        state_key = keys.macro_state(self.prefix, macro_instance_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.instances(self.prefix), info.instance_id, encode(info))
            pipe.sadd(keys.macro_instances(self.prefix), macro_instance_id)
            await self._push_absent(
                keys=[keys.macro_members(self.prefix, macro_instance_id)],
                args=[info.instance_id],
                client=pipe,
            )
            pipe.hset(state_key, f"{_STATE_FIELD}{info.instance_id}", state)
            pipe.hincrby(state_key, "epoch", 1)
            await pipe.execute()

    async def save_state(self, instance_id: str, macro_instance_id: str, state: AdminState) -> None:
        state_key = keys.macro_state(self.prefix, macro_instance_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(state_key, f"{_STATE_FIELD}{instance_id}", state)
            pipe.hincrby(state_key, "epoch", 1)
            await pipe.execute()

    async def delete_instances(self, removed: Iterable[tuple[str, str]]) -> None:
        """Forget (instance_id, macro_instance_id) pairs."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for instance_id, macro_instance_id in removed:
                state_key = keys.macro_state(self.prefix, macro_instance_id)
                pipe.hdel(keys.instances(self.prefix), instance_id)
                pipe.lrem(keys.macro_members(self.prefix, macro_instance_id), 0, instance_id)
                pipe.hdel(state_key, f"{_STATE_FIELD}{instance_id}")
                pipe.hincrby(state_key, "epoch", 1)
                pipe.delete(keys.instance_lease(self.prefix, instance_id))
            await pipe.execute()

    async def touch_instance_lease(self, instance_id: str, holder: str, ttl_seconds: float) -> None:
        await self.redis.set(
            keys.instance_lease(self.prefix, instance_id), holder, px=max(1, round(ttl_seconds * 1000))
        )

    async def save_config(self, values: Mapping[str, str]) -> None:
        """Store configuration keys (only the ones an operator set: unset keys keep following the
        coordinator's flags)."""
        await self.redis.hset(keys.config(self.prefix), mapping=dict(values))  # type: ignore[arg-type]
