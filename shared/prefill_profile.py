"""An instance's measured prefill times (prompt length → seconds), published with its KV capacity so the
coordinator can predict how long a prefill window's prompts take (EcoServe's admission check; the
coordinator's prefill-time predictor is built from `points`).

Plain data without torch, so a coordinator can decode it without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any


@dataclass(frozen=True)
class PrefillProfile:
    points: list[tuple[int, float]]  # (prompt tokens, seconds), lengths strictly increasing
    kv_blocks_total: int
    block_size: int
    measured_at: float  # unix seconds
    threads: int  # torch intra-op threads during the measurement

    def __post_init__(self) -> None:
        lengths = [n for n, _ in self.points]
        if any(b <= a for a, b in pairwise(lengths)):
            raise ValueError(f"profile lengths must be strictly increasing, got {lengths}")
        if any(n < 1 or s < 0 for n, s in self.points):
            raise ValueError("profile points need positive lengths and non-negative times")

    def to_dict(self) -> dict[str, Any]:
        """msgpack-ready: only lists, ints, floats."""
        return {
            "points": [[n, s] for n, s in self.points],
            "kv_blocks_total": self.kv_blocks_total,
            "block_size": self.block_size,
            "measured_at": self.measured_at,
            "threads": self.threads,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefillProfile:
        """The inverse of `to_dict`; ValueError naming the field when something is malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"a prefill profile is a map, got {type(data).__name__}")
        points = data.get("points")
        if not isinstance(points, list):
            raise ValueError("points: expected a list of [length, seconds]")
        parsed: list[tuple[int, float]] = []
        for i, point in enumerate(points):
            if (
                not isinstance(point, list | tuple)
                or len(point) != 2
                or not _is_int(point[0])
                or not _is_number(point[1])
            ):
                raise ValueError(f"points[{i}]: expected [length, seconds], got {point!r}")
            parsed.append((point[0], float(point[1])))
        for name in ("kv_blocks_total", "block_size", "threads"):
            if not _is_int(data.get(name)):
                raise ValueError(f"{name}: expected an integer, got {data.get(name)!r}")
        if not _is_number(data.get("measured_at")):
            raise ValueError(f"measured_at: expected a number, got {data.get('measured_at')!r}")
        return cls(
            points=parsed,
            kv_blocks_total=data["kv_blocks_total"],
            block_size=data["block_size"],
            measured_at=float(data["measured_at"]),
            threads=data["threads"],
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
