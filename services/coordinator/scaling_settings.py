"""Mitosis scaling's own settings (`ecoserve admin scaling`): whether the autoscaler acts, how its signals are
timed, and the overall scheduler's rule. Pure.

The bounds and the SLO (`n_lower`, `n_upper`, `ttft_slo`) are scheduling configuration keys
(scheduling_config.py), shared with the macro-instance dispatcher; `mitosis_config` joins the two.

Values arrive typed (msgpack) or as text (the CLI's KEY=VALUE, the Redis hash); a bad key or value raises
SettingsError naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.coordinator.mitosis import MitosisConfig
from services.coordinator.overall_scheduler import CHOICES

BOUND_KEYS = ("n_lower", "n_upper", "ttft_slo")  # scheduling configuration keys mitosis reads


class SettingsError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    text = value.decode() if isinstance(value, bytes) else value
    if isinstance(text, str) and text.strip().lower() in ("on", "true", "yes", "1"):
        return True
    if isinstance(text, str) and text.strip().lower() in ("off", "false", "no", "0"):
        return False
    raise ValueError("expected on/off")


def _int(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str | bytes):
        return int(value)
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def _seconds(value: Any) -> float:
    if type(value) in (int, float) or isinstance(value, str | bytes):
        number = float(value)
    else:
        raise ValueError(f"expected a number of seconds, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _choice(value: Any) -> str:
    name = value.decode() if isinstance(value, bytes) else value
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"expected one of {', '.join(sorted(CHOICES))}, got {value!r}")
    return name


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}, got {value}"


@dataclass(frozen=True)
class _Key:
    parse: Callable[[Any], Any]
    check: Callable[[Any], str | None]
    help: str


_KEYS: dict[str, _Key] = {
    "enabled": _Key(
        _bool,
        lambda _: None,
        "on: capacity follows the TTFT and saved-TPOT signals (new instances wait as spares); "
        "off: every new instance serves at once",
    ),
    "window": _Key(_seconds, lambda v: None if v > 0 else "must be positive", "seconds the signals average"),
    "min_samples": _Key(_int, _at_least(1), "fewer samples in the window are no evidence"),
    "hold": _Key(_seconds, _at_least(0), "seconds a signal must hold without a break before acting"),
    "cooldown": _Key(_seconds, _at_least(0), "seconds after a scaling action before the next"),
    "macro_choice": _Key(_choice, lambda _: None, "how a request's macro instance is chosen"),
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
        parsed: dict[str, Any] = {}
        for name, raw in updates.items():
            key = _KEYS.get(name)
            if key is None:
                raise SettingsError(name, f"unknown scaling setting (known: {', '.join(_KEYS)})")
            try:
                value = key.parse(raw)
            except ValueError as error:
                raise SettingsError(name, f"bad value {raw!r}: {error}") from None
            problem = key.check(value)
            if problem is not None:
                raise SettingsError(name, problem)
            parsed[name] = value
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
