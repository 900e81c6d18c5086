"""Service settings as dataclasses; each field becomes a `--flag-name` defaulting to `$ECOSERVE_FLAG_NAME`.

Precedence: command-line flag, then environment variable, then the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from shared.subjects import DEFAULT_PREFIX, check_id, check_prefix

ENV_PREFIX = "ECOSERVE_"
FUDG_ROLES = ("none", "prefill", "decode")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
) -> Any:
    """A config field with its help text; `factory` computes a per-process default (ids); a `secret` value
    stays out of repr() and --help, which end up in logs."""
    metadata = {"help": doc, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


def _generated_id(kind: str) -> Callable[[], str]:
    return lambda: f"{kind}-{secrets.token_hex(4)}"


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parser_for(tp: Any) -> tuple[Callable[[str], Any], bool]:
    """(str → value, optional) for a field annotation; only the types below make sense as flags."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        optional = len(members) < len(typing.get_args(tp))
        if len(members) != 1:
            raise TypeError(f"unsupported config field type {tp}")
        tp = members[0]
    if tp is bool:
        return _parse_bool, optional
    if tp in (str, int, float):
        return tp, optional
    raise TypeError(f"unsupported config field type {tp}")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}, got {text!r}")


@dataclass(kw_only=True)
class CommonConfig:
    """Settings every service needs."""

    nats_url: str = setting("nats://127.0.0.1:4222", "NATS server URL")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL")
    prefix: str = setting(DEFAULT_PREFIX, "prefix of every NATS subject and Redis key")
    log_level: str = setting("INFO", "logging level (DEBUG, INFO, WARNING, ERROR)")

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
        """Add a flag per field; flags already on the parser (shared by two configs) are left as they are."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            parse, optional = _parser_for(hints[f.name])
            variable = env_name(f.name)
            if variable in environ:
                raw = environ[variable]
                try:
                    default = None if optional and raw == "" else parse(raw)
                except ValueError as error:
                    raise ValueError(f"environment variable {variable}={raw!r}: {error}") from None
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = f.default
            flag = "--" + f.name.replace("_", "-")
            shown = "" if f.metadata.get("secret") else "; default: %(default)s"
            help_text = f"{f.metadata.get('help', '')} (env {variable}{shown})"
            kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
            if parse is _parse_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = parse
            try:
                parser.add_argument(flag, **kwargs)
            except argparse.ArgumentError:
                continue

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The config from parsed flags (fields missing from `args` keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


@dataclass(kw_only=True)
class RouterConfig(CommonConfig):
    """The HTTP router."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = setting(8000, "HTTP port")
    api_key: str | None = setting(None, "require `Authorization: Bearer <key>` when set", secret=True)
    router_id: str = setting(doc="this router's id (token subject name)", factory=_generated_id("router"))
    model: str | None = setting(None, "model folder or 'smollm2' (tokenizer and /v1/models name)")
    served_model_name: str | None = setting(
        None,
        "the model id clients use and /v1/models lists (default: the model folder's name; the --model value "
        "is accepted too)",
    )
    allowed_origins: str = setting(
        "*", "CORS: comma-separated origins web pages may call the API from ('*': any, as vLLM; '': none)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("router_id", self.router_id)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


@dataclass(kw_only=True)
class CoordinatorConfig(CommonConfig):
    """The coordinator (macro-instance scheduler, registry, scaling)."""

    coordinator_id: str = setting(doc="this coordinator's id", factory=_generated_id("coordinator"))
    lease_seconds: float = setting(3.0, "an instance silent for this long is considered dead")
    coordinator_lease_seconds: float = setting(5.0, "a standby coordinator takes over after this long")
    # Scheduling defaults; values set with `ecoserve admin config-set` (kept in Redis) override them. The
    # coordinator checks them all together at start (services/coordinator/scheduling_config.py).
    dispatch_policy: str = setting(
        "least_loaded", "least_loaded (NoDG/Sarathi), padg (rolling activation) or fudg (disaggregated)"
    )
    ttft_slo: float = setting(5.0, "PaDG: TTFT SLO in seconds")
    tpot_slo: float = setting(0.1, "PaDG: TPOT SLO in seconds")
    padg_variant: str = setting("paper", "PaDG admission check: paper or authors")
    prefill_rule: str = setting("interpolate", "PaDG prefill-time prediction: interpolate or authors")
    hold_outputs: bool = setting(False, "PaDG: instances hold output tokens while their window is open")
    pending_timeout: float = setting(5.0, "PaDG: seconds a request may wait for a prefill window")
    n_lower: int = setting(3, "mitosis: fewest instances per macro instance")
    n_upper: int = setting(6, "mitosis: most instances per macro instance")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("coordinator_id", self.coordinator_id)
        for name in ("lease_seconds", "coordinator_lease_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True)
class InstanceConfig(CommonConfig):
    """An instance process (its engine settings are the engine's own flags)."""

    instance_id: str = setting(doc="this instance's id (subjects, keys)", factory=_generated_id("instance"))
    heartbeat_interval: float = setting(0.5, "seconds between status reports while idle (busy: every step)")
    profile_prefill: str = setting(
        "auto", "measure prefill times at start-up for the coordinator: auto (padg policy only), on, off"
    )
    fudg_role: str = setting(
        "none",
        "FuDG role: none, prefill (hand every request to a decode instance after its first token) or decode",
    )
    drain_timeout: float = setting(30.0, "seconds a shutdown waits for held requests before failing them")
    served_model_name: str | None = setting(
        None, "model name announced to the coordinator (default: --model as given, or 'smollm2')"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_id("instance_id", self.instance_id)
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {self.heartbeat_interval}")
        if self.profile_prefill not in ("auto", "on", "off"):
            raise ValueError(f"profile_prefill must be auto, on or off, got {self.profile_prefill!r}")
        if self.fudg_role not in FUDG_ROLES:
            raise ValueError(f"fudg_role must be one of {', '.join(FUDG_ROLES)}, got {self.fudg_role!r}")
        if not self.drain_timeout >= 0:  # also rejects NaN
            raise ValueError(f"drain_timeout must be non-negative, got {self.drain_timeout}")
