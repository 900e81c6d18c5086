"""One request's state inside the engine: its tokens, how many have KV in the cache, and its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from services.instance.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV was dropped and will be recomputed)
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop token id (the router adds stop strings)
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"
    # Left this engine after its prefill, its KV handed out for another engine to decode (FuDG); not a
    # finish of the request itself.
    TRANSFERRED = "transferred"


@dataclass
class TokenLogprobs:
    """Log-probability of the sampled token and the top-N alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the sampled token in the distribution
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens (prompt, then output) whose KV is in this sequence's blocks.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Per-request torch.Generator for seeded sampling, created by the sampler on first use.
    generator: Any = None
    # FuDG prefill: after its first token, hand the request out with its KV instead of decoding it.
    export_kv: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token lacks KV: the next step feeds one token."""
        return (
            self.status is SequenceStatus.RUNNING
            and self.num_uncomputed_tokens == 1
            and bool(self.output_token_ids)
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + output."""
        n_prompt = len(self.prompt_token_ids)
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : stop - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n_prompt]
