"""Per-request sampling parameters, named as vLLM and OpenAI name them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_TOP_LOGPROBS = 20
# Below this temperature sampling is greedy (dividing by it would overflow fp32), as in vLLM.
GREEDY_TEMPERATURE = 1e-5


class ParameterError(ValueError):
    """A request parameter is invalid; `field` names it so an API layer can report it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's plus the top N
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> SamplingParams:
        """Raise ParameterError naming the first bad field; return self so calls chain."""
        _require_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ParameterError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        _require_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ParameterError("temperature", f"must be non-negative, got {self.temperature}")
        _require_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ParameterError("top_k", f"must be -1 or 0 (disabled) or positive, got {self.top_k}")
        _require_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ParameterError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _require_int("seed", self.seed)
            if not -(2**63) <= self.seed < 2**63:  # a torch generator's seed, as vLLM bounds it
                raise ParameterError("seed", f"must fit in a signed 64-bit integer, got {self.seed}")
        _require_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ParameterError("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ParameterError(name, f"must be in [-2, 2], got {value}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParameterError("stop", "must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ParameterError("stop_token_ids", "must be a list of non-negative integers")
        _require_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParameterError("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise ParameterError("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParameterError(unknown[0], "unknown sampling parameter")
        return cls(**data).validate()


def _require_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(name, f"must be an integer, got {value!r}")


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ParameterError(name, f"must be a number, got {value!r}")
