"""The admin commands of mitosis scaling (contract in admin_api.py), on a ScalingController; admin.py routes
`add-instance`, `remove-instance`, `scaling-get` and `scaling-set` here and adds `status_section` to `status`.

`scaling-set` takes scaling settings (scaling_settings.py, persisted by the controller) and the bounds
`n_lower`, `n_upper`, `ttft_slo`, which are scheduling configuration keys: those go through the leader's
`update_config` (validated and persisted there, shared with the PaDG dispatcher) before the controller
takes them. Everything is validated before anything is stored.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from services.coordinator.scaling import ScalingController, ScalingError
from services.coordinator.scaling_settings import BOUND_KEYS, ScalingSettings

EVENTS_IN_STATUS = 10

UpdateConfig = Callable[[dict[str, Any]], Awaitable[Any]]  # the leader's: returns the SchedulingConfig


class ScalingCommands:
    def __init__(
        self,
        controller: ScalingController,
        update_config: UpdateConfig,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.controller = controller
        self._update_config = update_config
        self._monotonic = monotonic

    async def add_instance(self, args: dict[str, Any]) -> dict[str, Any]:
        now = self._monotonic()
        instance_id = _optional_text(args, "instance_id")
        macro_id = _optional_text(args, "macro_instance_id")
        events = await self.controller.add_instance(now, instance_id, macro_id)
        return {"events": [e.to_dict() for e in events], "scaling": self.controller.view(now)}

    async def remove_instance(self, args: dict[str, Any]) -> dict[str, Any]:
        now = self._monotonic()
        instance_id = _optional_text(args, "instance_id")
        if instance_id is None:
            raise ScalingError("missing argument 'instance_id'")
        events = await self.controller.remove_instance(now, instance_id)
        return {"events": [e.to_dict() for e in events], "scaling": self.controller.view(now)}

    async def get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"scaling": self.controller.view(self._monotonic()), "keys": keys_help()}

    async def set(self, args: dict[str, Any]) -> dict[str, Any]:
        known = keys_help()
        unknown = sorted(set(args) - set(known))
        if not args or unknown:
            what = f"unknown key {unknown[0]!r}" if unknown else "scaling-set needs at least one key"
            raise ScalingError(f"{what} (known: {', '.join(known)})")
        settings = {k: v for k, v in args.items() if k not in BOUND_KEYS}
        bounds = {k: v for k, v in args.items() if k in BOUND_KEYS}
        self.controller.settings.updated(settings)  # SettingsError before anything is stored
        now = self._monotonic()
        if bounds:
            values = (await self._update_config(bounds)).to_dict()  # ConfigError: nothing stored
            # The leader may have passed them on already; a second time changes nothing.
            await self.controller.set_bounds(now, **{key: values[key] for key in BOUND_KEYS})
        if settings:
            await self.controller.update_settings(settings, now)
        return {"scaling": self.controller.view(now), "changed": sorted(args)}

    async def status_section(self) -> dict[str, Any]:
        """For `status`: spares, draining instances, settings, signals and the last events."""
        section: dict[str, Any] = {"scaling": self.controller.view(self._monotonic())}
        try:
            events = await self.controller.recent_events(EVENTS_IN_STATUS)
            section["scaling_events"] = [e.to_dict() for e in events]
        except (RedisError, OSError) as error:
            section["scaling_events"] = []
            section["scaling_events_error"] = f"{type(error).__name__}: {error}"
        return section


def keys_help() -> dict[str, str]:
    """Every key `scaling-set` takes → help text."""
    return {
        "n_lower": "fewest instances per macro instance (N_l; scheduling configuration)",
        "n_upper": "most instances per macro instance (N_u >= 2*N_l - 1; scheduling configuration)",
        "ttft_slo": "TTFT SLO in seconds: expand above it (scheduling configuration)",
        **ScalingSettings.keys(),
    }


def _optional_text(args: dict[str, Any], name: str) -> str | None:
    value = args.get(name)
    if value is not None and not isinstance(value, str):
        raise ScalingError(f"argument {name!r} must be a string, got {type(value).__name__}")
    return value or None
