"""The scaling event log: one Redis stream entry (`keys.scaling_events`) per change that mitosis scaling makes
or an operator asks for, for `ecoserve admin status`, audits and plots. Bounded: XADD MAXLEN ~ keeps
roughly the last `maxlen` entries.

Entry fields, all text (readable with `redis-cli XREVRANGE <prefix>:events:scaling + - COUNT 10`):
  time         unix seconds
  action       add | remove | split | merge | spare (a removed instance finished draining) | lost | configure
  cause        expand | contract | repair | join (registered while autoscaling is off) | manual | drained
               | departed | config
  macros       macro instance ids involved, comma-separated (a split or merge: source first)
  instances    instance ids involved, comma-separated
  reason       why, in words
  mean_ttft    seconds, the expansion signal at the time ("" without enough samples)
  slack_ratio  median saved TPOT / its bound, the contraction signal ("" without enough samples, "inf")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from shared import keys

DEFAULT_MAXLEN = 10_000


@dataclass(frozen=True, slots=True)
class ScalingEvent:
    time: float  # unix seconds
    action: str
    cause: str
    macros: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    reason: str = ""
    mean_ttft: float | None = None
    slack_ratio: float | None = None
    event_id: str | None = None  # the stream entry id, once stored

    def to_fields(self) -> dict[str, str]:
        return {
            "time": repr(self.time),
            "action": self.action,
            "cause": self.cause,
            "macros": ",".join(self.macros),
            "instances": ",".join(self.instances),
            "reason": self.reason,
            "mean_ttft": _number_text(self.mean_ttft),
            "slack_ratio": _number_text(self.slack_ratio),
        }

    @classmethod
    def from_fields(cls, event_id: str, fields: Mapping[str, str]) -> ScalingEvent:
        """Missing or unreadable fields become empty: an entry written by hand must not break the reader."""
        return cls(
            time=_number(fields.get("time")) or 0.0,
            action=fields.get("action", ""),
            cause=fields.get("cause", ""),
            macros=_ids(fields.get("macros", "")),
            instances=_ids(fields.get("instances", "")),
            reason=fields.get("reason", ""),
            mean_ttft=_number(fields.get("mean_ttft")),
            slack_ratio=_number(fields.get("slack_ratio")),
            event_id=event_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """For admin replies; an infinite ratio becomes "inf" (JSON, the CLI's --json, has no infinity)."""
        return {
            "event_id": self.event_id,
            "time": self.time,
            "action": self.action,
            "cause": self.cause,
            "macros": list(self.macros),
            "instances": list(self.instances),
            "reason": self.reason,
            "mean_ttft": self.mean_ttft,
            "slack_ratio": "inf" if self.slack_ratio == math.inf else self.slack_ratio,
        }


def _number_text(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if value == math.inf else repr(value)


def _number(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _ids(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


class ScalingLog:
    def __init__(self, redis: aioredis.Redis, prefix: str, maxlen: int = DEFAULT_MAXLEN):
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, got {maxlen}")
        self.redis = redis
        self.key = keys.scaling_events(prefix)
        self.maxlen = maxlen

    async def append(self, events: Sequence[ScalingEvent]) -> list[str]:
        """Store the events in order; their stream ids."""
        if not events:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(
                    self.key,
                    cast(Any, event.to_fields()),
                    maxlen=self.maxlen,
                    approximate=True,  # MAXLEN ~: trims whole radix-tree nodes, cheap
                )
            ids = await pipe.execute()
        return [_text(i) for i in ids]

    async def recent(self, count: int) -> list[ScalingEvent]:
        """The last `count` events, oldest first."""
        if count < 1:
            return []
        entries = await self.redis.xrevrange(self.key, count=count)
        return [
            ScalingEvent.from_fields(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()})
            for entry_id, fields in reversed(entries)
        ]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
