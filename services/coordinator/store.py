"""Redis persistence of the coordinator's durable state (layout in shared/keys.py and docs/ARCHITECTURE.md).

- `keys.instances`: hash instance_id → InstanceInfo, msgpack via shared.wire (what routers may read).
- `keys.macro_instances`: set of macro instance ids.
- `keys.macro_members(m)`: list of instance ids in rolling order; an instance keeps its place when it
  registers again.
- `keys.macro_state(m)`: hash with `epoch` (bumped on every membership or state change, so readers can tell
  a stale cache) and `state:<instance_id>` → "ready" | "draining" (the operator's intent survives restarts);
  under PaDG also `active` (the prefill instance), `window_epoch` (the PrefillWindow epoch: only ever grows),
  `window_opened_at` (unix seconds) and `windows:<instance_id>` (prefill windows it opened).
- `keys.instance_lease(id)`: the instance's latest wire-encoded InstanceStatus (its state name before its
  first report), with a TTL of the instance lease, refreshed from heartbeats (routers read it for /health
  and the cluster gauges).
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
_WINDOWS_FIELD = "windows:"
_STATES: frozenset[str] = frozenset({"ready", "draining"})

# Append unless already a member: a re-registering instance keeps its place in the rolling order.
_PUSH_ABSENT = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
    return redis.call('RPUSH', KEYS[1], ARGV[1])
end
return 0
"""

# Record a PaDG activation. ARGV: epoch, active instance ('' = none), opened_at, count ('1' = one more window
# for the active instance). The activation itself is written only when its epoch is newer than the stored
# one: activations persist from concurrent tasks, and an older one finishing last must not win.
_SAVE_WINDOW = """
if ARGV[4] == '1' and ARGV[2] ~= '' then
    redis.call('HINCRBY', KEYS[1], 'windows:' .. ARGV[2], 1)
end
local current = tonumber(redis.call('HGET', KEYS[1], 'window_epoch') or '0') or 0
if tonumber(ARGV[1]) <= current then
    return 0
end
redis.call('HSET', KEYS[1], 'window_epoch', ARGV[1])
if ARGV[2] == '' then
    redis.call('HDEL', KEYS[1], 'active', 'window_opened_at')
else
    redis.call('HSET', KEYS[1], 'active', ARGV[2], 'window_opened_at', ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class StoredWindow:
    """A macro instance's persisted PaDG activation."""

    active: str | None = None
    epoch: int = 0
    opened_at: float | None = None  # unix seconds
    opened: dict[str, int] = field(default_factory=dict)  # instance → prefill windows it opened


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
    windows: dict[str, StoredWindow] = field(default_factory=dict)  # macro instance → PaDG activation
    problems: list[str] = field(default_factory=list)


class Store:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis = redis
        self.prefix = prefix
        self._push_absent = redis.register_script(_PUSH_ABSENT)
        self._save_window = redis.register_script(_SAVE_WINDOW)

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
            snapshot.windows[macro] = _window(state, snapshot.problems, macro)
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
                pipe.hdel(state_key, f"{_STATE_FIELD}{instance_id}", f"{_WINDOWS_FIELD}{instance_id}")
                pipe.hincrby(state_key, "epoch", 1)
                pipe.delete(keys.instance_lease(self.prefix, instance_id))
            await pipe.execute()

    async def move_instance(
        self, instance_id: str, from_macro: str, to_macro: str, state: AdminState
    ) -> None:
        """Move a member to the end of another macro instance's rolling order (mitosis)."""
        source, target = keys.macro_state(self.prefix, from_macro), keys.macro_state(self.prefix, to_macro)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(keys.macro_members(self.prefix, from_macro), 0, instance_id)
            pipe.hdel(source, f"{_STATE_FIELD}{instance_id}", f"{_WINDOWS_FIELD}{instance_id}")
            pipe.hincrby(source, "epoch", 1)
            pipe.sadd(keys.macro_instances(self.prefix), to_macro)
            await self._push_absent(
                keys=[keys.macro_members(self.prefix, to_macro)], args=[instance_id], client=pipe
            )
            pipe.hset(target, f"{_STATE_FIELD}{instance_id}", state)
            pipe.hincrby(target, "epoch", 1)
            await pipe.execute()

    async def load_window(self, macro_instance_id: str) -> StoredWindow:
        state = cast(
            dict[bytes, bytes], await self.redis.hgetall(keys.macro_state(self.prefix, macro_instance_id))
        )
        return _window(state, [], macro_instance_id)

    async def save_window(
        self, macro_instance_id: str, *, epoch: int, active: str | None, opened_at: float, opened: bool
    ) -> bool:
        """Persist a PaDG activation (`opened`: `active` opened one more window); False when a newer epoch
        was stored already (only the window count changed then)."""
        written = await self._save_window(
            keys=[keys.macro_state(self.prefix, macro_instance_id)],
            args=[epoch, active or "", repr(opened_at), "1" if opened else "0"],
        )
        return bool(written)

    async def touch_instance_lease(self, instance_id: str, value: bytes | str, ttl_seconds: float) -> None:
        await self.redis.set(
            keys.instance_lease(self.prefix, instance_id), value, px=max(1, round(ttl_seconds * 1000))
        )

    async def save_config(self, values: Mapping[str, str]) -> None:
        """Store configuration keys (only the ones an operator set: unset keys keep following the
        coordinator's flags)."""
        await self.redis.hset(keys.config(self.prefix), mapping=dict(values))  # type: ignore[arg-type]


def _window(state: dict[bytes, bytes], problems: list[str], macro: str) -> StoredWindow:
    """The PaDG fields of a macro state hash; unreadable ones are reported in `problems` and left out."""
    text = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in state.items()}
    opened: dict[str, int] = {}
    for name, value in text.items():
        if name.startswith(_WINDOWS_FIELD):
            try:
                opened[name.removeprefix(_WINDOWS_FIELD)] = int(value)
            except ValueError:
                problems.append(f"macro {macro!r}: {name}={value!r} is not a count")
    try:
        epoch = int(text.get("window_epoch", "0"))
        opened_at = float(text["window_opened_at"]) if "window_opened_at" in text else None
    except ValueError:
        problems.append(f"macro {macro!r}: unreadable PaDG window state {text!r}")
        return StoredWindow(opened=opened)
    active = text.get("active") or None
    return StoredWindow(active=active, epoch=epoch, opened_at=opened_at, opened=opened)
