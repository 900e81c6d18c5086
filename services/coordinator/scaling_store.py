"""Redis persistence of mitosis scaling's own settings (scaling_settings.py): a hash
`<prefix>:scaling:settings` of the keys an operator set, values as text. Unset keys keep following the
coordinator's defaults, as the scheduling configuration hash does. Only the coordinator holding the lease
writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import redis.asyncio as aioredis

from services.coordinator.scaling_settings import ScalingSettings
from shared.subjects import check_prefix


def settings_key(prefix: str) -> str:
    """Hash: scaling setting → value as text (beside shared/keys.py's layout; `scaling` is no id)."""
    return f"{check_prefix(prefix)}:scaling:settings"


class ScalingStore:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis = redis
        self.key = settings_key(prefix)

    async def load(self, defaults: ScalingSettings) -> tuple[ScalingSettings, list[str]]:
        """The stored settings over `defaults`, and the stored entries that could not be used."""
        stored = cast(dict[bytes, bytes], await self.redis.hgetall(self.key))
        return defaults.with_stored(stored)

    async def save(self, settings: ScalingSettings, changed: Mapping[str, Any]) -> None:
        """Store the `changed` keys with their values in `settings`."""
        text = settings.to_text()
        values = {name: text[name] for name in changed}
        if values:
            await self.redis.hset(self.key, mapping=cast(Any, values))
