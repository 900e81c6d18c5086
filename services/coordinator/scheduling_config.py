"""The cluster's scheduling configuration: the keys `ecoserve admin config` reads and changes at run time.

Values arrive typed (msgpack) or as text (the CLI's KEY=VALUE, the Redis hash), so every key has a parser
that accepts both and a check; a bad key or value raises ConfigError naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.coordinator.padg import VARIANTS
from services.coordinator.prefill_model import RULES
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

# least_loaded: NoDG/Sarathi balancing; padg: rolling prefill activation (services/coordinator/padg.py);
# fudg: a prefill-role and a decode-role instance per request (services/coordinator/fudg_dispatch.py).
DISPATCH_POLICIES: tuple[str, ...] = ("least_loaded", "padg", "fudg")


class ConfigError(SettingError):
    """A bad scheduling configuration key or value (flags or `config-set`), named by its key."""


_KEYS: dict[str, Key] = {
    "dispatch_policy": Key(
        choice(DISPATCH_POLICIES),
        anything,
        "how a macro instance picks the instance for a request: least_loaded (NoDG/Sarathi), padg, or fudg "
        "(a prefill and a decode instance, by their --fudg-role)",
    ),
    "max_waiting_per_instance": Key(
        parse_int, at_least(1), "queued (waiting + not yet reported) requests per instance before 429"
    ),
    "lease_seconds": Key(parse_float, at_least(0.1), "an instance silent for this long is removed"),
    "dispatch_timeout": Key(parse_float, at_least(0.05), "seconds to wait for an instance to take a request"),
    "ttft_slo": Key(parse_float, positive, "PaDG: TTFT SLO in seconds (a prefill window's budget)"),
    "tpot_slo": Key(parse_float, positive, "PaDG: time-per-output-token SLO in seconds (decode slack)"),
    "padg_variant": Key(
        choice(VARIANTS), anything, "PaDG admission check: paper (Algorithm 1) or authors (official code)"
    ),
    "prefill_rule": Key(
        choice(RULES), anything, "PaDG prefill-time prediction from the profile: interpolate or authors"
    ),
    "hold_outputs": Key(
        parse_bool, anything, "PaDG: instances hold output tokens while their window is open"
    ),
    "pending_timeout": Key(
        parse_float,
        at_least(0.0),
        # Below the router's 10 s submit timeout, or a late answer finds nobody waiting for it.
        "PaDG paper variant: seconds a request may wait for a window before 429 (under the router's 10 s)",
    ),
    "n_lower": Key(parse_int, at_least(1), "mitosis: fewest instances per macro instance (N_l)"),
    "n_upper": Key(parse_int, at_least(1), "mitosis: most instances per macro instance (N_u >= 2*N_l - 1)"),
}


@dataclass(frozen=True)
class SchedulingConfig:
    dispatch_policy: str = "least_loaded"
    # vLLM queues without bound, and `vllm bench serve` sends a whole dataset at once: 64 turned away a
    # quarter of a 256-request burst with 429s that vLLM would have queued. Still bounded, still settable.
    max_waiting_per_instance: int = 1024
    lease_seconds: float = 3.0
    dispatch_timeout: float = 5.0
    ttft_slo: float = 5.0
    tpot_slo: float = 0.1
    padg_variant: str = "paper"
    prefill_rule: str = "interpolate"
    hold_outputs: bool = False
    pending_timeout: float = 5.0
    n_lower: int = 3
    n_upper: int = 6

    @staticmethod
    def keys() -> dict[str, str]:
        """key → help text."""
        return {name: key.help for name, key in _KEYS.items()}

    def updated(self, updates: Mapping[str, Any]) -> SchedulingConfig:
        """A copy with `updates` applied, all validated first (ConfigError on the first bad one)."""
        parsed = parse_updates(_KEYS, updates, ConfigError, "configuration key")
        config = dataclasses.replace(self, **parsed)
        # Splitting N_u + 1 instances must leave two macro instances of at least N_l each.
        if 2 * config.n_lower - 1 > config.n_upper:
            key = "n_upper" if "n_upper" in parsed else "n_lower"
            raise ConfigError(
                key, f"need 2*n_lower - 1 <= n_upper, got n_lower={config.n_lower}, n_upper={config.n_upper}"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_text(self) -> dict[str, str]:
        """As stored in the Redis hash (readable with redis-cli)."""
        return {name: _text(value) for name, value in self.to_dict().items()}

    def with_stored(self, stored: Mapping[bytes, bytes]) -> tuple[SchedulingConfig, list[str]]:
        """Apply the Redis hash over these defaults; bad or unknown stored entries are skipped and
        described in the returned problems (someone edited Redis by hand, or an older version wrote it)."""
        text = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in stored.items()}
        with contextlib.suppress(ConfigError):
            return self.updated(text), []  # all at once: keys checked together (n_lower, n_upper) agree
        config, problems = self, []
        for raw_key, raw_value in stored.items():
            name = raw_key.decode(errors="replace")
            try:
                config = config.updated({name: raw_value.decode(errors="replace")})
            except ConfigError as error:
                problems.append(str(error))
        return config, problems


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def scheduling_defaults(flags: Any) -> SchedulingConfig:
    """The configuration the coordinator's flags give (a `CoordinatorConfig`: every attribute named like a
    key); ConfigError names a bad one, so a wrong flag stops the coordinator at start."""
    return SchedulingConfig().updated({name: getattr(flags, name) for name in _KEYS if hasattr(flags, name)})
