"""The coordinator lease: a Redis key naming the one coordinator that acts for a macro instance.

Taken with `SET key holder NX PX ttl`, renewed and released only by its holder (compare-and-set scripts), so a
coordinator that was partitioned away cannot extend or delete a lease someone else took over.
`valid_until` is measured from *before* each successful request, so the holder's own deadline never outlives
the key in Redis: once it passes, the holder must stop acting whether or not Redis can still be reached.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class CoordinatorLease:
    def __init__(self, redis: aioredis.Redis, key: str, holder: str, ttl_seconds: float):
        self.key = key
        self.holder = holder
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self._redis = redis
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self.valid_until = 0.0  # time.monotonic() deadline; 0 = not held

    @property
    def held(self) -> bool:
        return time.monotonic() < self.valid_until

    def remaining(self) -> float:
        return self.valid_until - time.monotonic()

    async def acquire(self) -> bool:
        """Take the lease if it is free (or already ours, e.g. after a restart with the same id)."""
        started = time.monotonic()
        taken = await self._redis.set(self.key, self.holder, nx=True, px=self.ttl_ms)
        if not taken:
            taken = bool(await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))
        self.valid_until = started + self.ttl_ms / 1000 if taken else 0.0
        return bool(taken)

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if someone else holds it now."""
        started = time.monotonic()
        renewed = bool(await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))
        self.valid_until = started + self.ttl_ms / 1000 if renewed else 0.0
        return renewed

    async def release(self) -> None:
        """Give the lease up so a standby takes over now instead of after the TTL."""
        self.valid_until = 0.0
        await self._release(keys=[self.key], args=[self.holder])

    async def current_holder(self) -> str | None:
        value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
