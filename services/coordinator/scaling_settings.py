"""Mitosis scaling's own settings (`ecoserve admin scaling`): whether the autoscaler acts, how its signals are
timed, and the overall scheduler's rule. Pure.

The bounds and the SLO (`n_lower`, `n_upper`, `ttft_slo`) are scheduling configuration keys
(scheduling_config.py), shared with the macro-instance dispatcher; `mitosis_config` joins the two.

Values arrive typed (msgpack) or as text (the CLI's KEY=VALUE, the Redis hash); a bad key or value raises
SettingsError naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.coordinator.mitosis import MitosisConfig
from services.coordinator.overall_scheduler import CHOICES
from services.coordinator.setting_keys import (
    Key,
    SettingError,
    anything,
    at_least,
    choice,
    parse_bool,
    parse_float,
    parse_int,
    parse_updates,
    positive,
)

BOUND_KEYS = ("n_lower", "n_upper", "ttft_slo")  # scheduling configuration keys mitosis reads


class SettingsError(SettingError):
    """A bad mitosis setting (`ecoserve admin scaling KEY=VALUE`), named by its key."""


_KEYS: dict[str, Key] = {
    "enabled": Key(
        parse_bool,
        anything,
        "on: capacity follows the TTFT and saved-TPOT signals (new instances wait as spares); "
        "off: every new instance serves at once",
    ),
    "window": Key(parse_float, positive, "seconds the signals average"),
    "min_samples": Key(parse_int, at_least(1), "fewer samples in the window are no evidence"),
    "hold": Key(parse_float, at_least(0), "seconds a signal must hold without a break before acting"),
    "cooldown": Key(parse_float, at_least(0), "seconds after a scaling action before the next"),
    "macro_choice": Key(choice(CHOICES), anything, "how a request's macro instance is chosen"),
}


@dataclass(frozen=True)
class ScalingSettings:
    # Off by default: a fixed set of instances all serve, so benchmarks measure what was started.
    enabled: bool = False
    window: float = 30.0
    min_samples: int = 8
    hold: float = 10.0
    cooldown: float = 60.0
    macro_choice: str = "size_weighted"

    @staticmethod
    def keys() -> dict[str, str]:
        """key → help text."""
        return {name: key.help for name, key in _KEYS.items()}

    def updated(self, updates: Mapping[str, Any]) -> ScalingSettings:
        """A copy with `updates` applied, all validated first (SettingsError on the first bad one)."""
        parsed = parse_updates(_KEYS, updates, SettingsError, "scaling setting")
        return dataclasses.replace(self, **parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_text(self) -> dict[str, str]:
        """As stored in the Redis hash (readable with redis-cli); booleans as on/off."""
        return {
            name: ("on" if value else "off") if isinstance(value, bool) else str(value)
            for name, value in self.to_dict().items()
        }

    def with_stored(self, stored: Mapping[bytes, bytes]) -> tuple[ScalingSettings, list[str]]:
        """Apply the Redis hash over these defaults; bad or unknown entries are skipped and described."""
        settings, problems = self, []
        for raw_key, raw_value in stored.items():
            try:
                settings = settings.updated({raw_key.decode(errors="replace"): raw_value})
            except SettingsError as error:
                problems.append(str(error))
        return settings, problems

    def mitosis_config(self, *, n_lower: int, n_upper: int, ttft_slo: float) -> MitosisConfig:
        """The planner's configuration (ValueError when the bounds do not fit together)."""
        return MitosisConfig(
            n_lower=n_lower,
            n_upper=n_upper,
            ttft_slo=ttft_slo,
            window=self.window,
            min_samples=self.min_samples,
            hold=self.hold,
            cooldown=self.cooldown,
        )
