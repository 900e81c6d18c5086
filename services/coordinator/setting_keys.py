"""Typed settings that operators change at run time: the scheduling configuration (scheduling_config.py) and
mitosis's own settings (scaling_settings.py) are both tables of these keys.

Values arrive typed (msgpack) or as text (the CLI's KEY=VALUE, a Redis hash), so every key has a parser that
accepts both and a check; `parse_updates` applies a table to a mapping of updates and raises the caller's
error type naming the first bad key. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class SettingError(ValueError):
    """A bad key or value; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Key:
    parse: Callable[[Any], Any]  # raises ValueError
    check: Callable[[Any], str | None]  # the problem with a parsed value, or None
    help: str


def parse_updates(
    keys: Mapping[str, Key], updates: Mapping[str, Any], error: type[SettingError], unknown: str
) -> dict[str, Any]:
    """Every update parsed and checked; `error(key, message)` on the first bad one (`unknown` names what
    the table is, for an unknown key)."""
    parsed: dict[str, Any] = {}
    for name, raw in updates.items():
        key = keys.get(name)
        if key is None:
            raise error(name, f"unknown {unknown} (known: {', '.join(keys)})")
        try:
            value = key.parse(raw)
        except ValueError as problem:
            raise error(name, f"bad value {raw!r}: {problem}") from None
        problem = key.check(value)
        if problem is not None:
            raise error(name, problem)
        parsed[name] = value
    return parsed


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def parse_int(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str | bytes):
        return int(value)
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def parse_float(value: Any) -> float:
    """A finite number (seconds, mostly)."""
    if type(value) in (int, float) or isinstance(value, str | bytes):
        number = float(value)
    else:
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def parse_bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    text = _text(value)
    if isinstance(text, str):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"expected on/off (true/false), got {value!r}")


def choice(choices: tuple[str, ...] | Mapping[str, Any]) -> Callable[[Any], str]:
    names = tuple(choices)

    def parse(value: Any) -> str:
        name = _text(value)
        if not isinstance(name, str) or name not in names:
            raise ValueError(f"expected one of {', '.join(names)}, got {value!r}")
        return name

    return parse


def at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}, got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def anything(_: Any) -> str | None:
    return None
