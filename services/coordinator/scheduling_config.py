"""The cluster's scheduling configuration: the keys `ecoserve admin config` reads and changes at run time.

Values arrive typed (msgpack) or as text (the CLI's KEY=VALUE, the Redis hash), so every key has a parser
that accepts both and a check; a bad key or value raises ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.coordinator.dispatch import POLICIES


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _int(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str | bytes):
        return int(value)
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def _float(value: Any) -> float:
    if type(value) in (int, float) or isinstance(value, str | bytes):
        number = float(value)
    else:
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _policy(value: Any) -> str:
    name = value.decode() if isinstance(value, bytes) else value
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"expected one of {', '.join(sorted(POLICIES))}, got {value!r}")
    return name


def _at_least(minimum: float) -> Callable[[float], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}, got {value}"


@dataclass(frozen=True)
class _Key:
    parse: Callable[[Any], Any]
    check: Callable[[Any], str | None]
    help: str


_KEYS: dict[str, _Key] = {
    "dispatch_policy": _Key(_policy, lambda _: None, "how a macro instance picks the instance for a request"),
    "max_waiting_per_instance": _Key(
        _int, _at_least(1), "queued (waiting + not yet reported) requests per instance before 429"
    ),
    "lease_seconds": _Key(_float, _at_least(0.1), "an instance silent for this long is removed"),
    "dispatch_timeout": _Key(_float, _at_least(0.05), "seconds to wait for an instance to take a request"),
}


@dataclass(frozen=True)
class SchedulingConfig:
    dispatch_policy: str = "least_loaded"
    max_waiting_per_instance: int = 64
    lease_seconds: float = 3.0
    dispatch_timeout: float = 5.0

    @staticmethod
    def keys() -> dict[str, str]:
        """key → help text."""
        return {name: key.help for name, key in _KEYS.items()}

    def updated(self, updates: Mapping[str, Any]) -> SchedulingConfig:
        """A copy with `updates` applied, all validated first (ConfigError on the first bad one)."""
        parsed: dict[str, Any] = {}
        for name, raw in updates.items():
            key = _KEYS.get(name)
            if key is None:
                raise ConfigError(name, f"unknown configuration key (known: {', '.join(_KEYS)})")
            try:
                value = key.parse(raw)
            except ValueError as error:
                raise ConfigError(name, f"bad value {raw!r}: {error}") from None
            problem = key.check(value)
            if problem is not None:
                raise ConfigError(name, problem)
            parsed[name] = value
        return dataclasses.replace(self, **parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_text(self) -> dict[str, str]:
        """As stored in the Redis hash (readable with redis-cli)."""
        return {name: str(value) for name, value in self.to_dict().items()}

    def with_stored(self, stored: Mapping[bytes, bytes]) -> tuple[SchedulingConfig, list[str]]:
        """Apply the Redis hash over these defaults; bad or unknown stored entries are skipped and
        described in the returned problems (someone edited Redis by hand, or an older version wrote it)."""
        config, problems = self, []
        for raw_key, raw_value in stored.items():
            name = raw_key.decode(errors="replace")
            try:
                config = config.updated({name: raw_value.decode(errors="replace")})
            except ConfigError as error:
                problems.append(str(error))
        return config, problems
