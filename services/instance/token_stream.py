"""One request's chunks: engine outputs become numbered TokenChunks for the requesting router.

Every chunk carries the next `seq` (0, 1, 2, …) so the router detects a lost one. `StepPublisher`
(step_publisher.py) makes sure each request gets exactly one terminal chunk (finished, or `error` set).
"""

from __future__ import annotations

from collections.abc import Callable

from services.instance.engine.llm_engine import RequestOutput
from services.instance.engine.sequence import TokenLogprobs
from shared.messages import TokenChunk, TokenLogprob


def to_wire_logprobs(logprobs: list[TokenLogprobs] | None) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    return [
        TokenLogprob(
            token_id=lp.token_id,
            logprob=float(lp.logprob),
            rank=lp.rank,
            top_ids=[token for token, _ in lp.top],
            top_logprobs=[float(value) for _, value in lp.top],
        )
        for lp in logprobs
    ]


class ChunkBuilder:
    """Numbers one request's chunks and keeps what later chunks repeat (counts, timings)."""

    def __init__(self, request_id: str, prompt_tokens: int, to_unix: Callable[[float], float]):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._to_unix = to_unix  # engine clock → unix seconds
        self.next_seq = 0
        self.completion_tokens = 0
        self.queue_time: float | None = None
        self.first_token_time: float | None = None

    def from_output(self, out: RequestOutput) -> TokenChunk:
        # An abort made by AsyncEngine carries no counts; keep the ones already reported.
        self.completion_tokens = max(self.completion_tokens, out.num_output_tokens)
        if self.queue_time is None and out.first_scheduled_time is not None and out.arrival_time is not None:
            self.queue_time = max(0.0, out.first_scheduled_time - out.arrival_time)
        if self.first_token_time is None and out.first_token_time is not None:
            self.first_token_time = self._to_unix(out.first_token_time)
        return self._chunk(
            list(out.new_token_ids),
            finished=out.finished,
            logprobs=to_wire_logprobs(out.new_logprobs),
            finish_reason=out.finish_reason if out.finished else None,
            stop_reason=out.stop_reason if out.finished else None,
        )

    def aborted(self) -> TokenChunk:
        """The terminal chunk of a request the router aborted (counts as reported so far)."""
        return self._chunk([], finished=True, finish_reason="abort")

    def error(self, message: str) -> TokenChunk:
        return self._chunk([], finished=True, finish_reason="error", error=message)

    def _chunk(
        self,
        token_ids: list[int],
        *,
        finished: bool,
        logprobs: list[TokenLogprob] | None = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        error: str | None = None,
    ) -> TokenChunk:
        chunk = TokenChunk(
            request_id=self.request_id,
            seq=self.next_seq,
            token_ids=token_ids,
            finished=finished,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            error=error,
            queue_time=self.queue_time,
            first_token_time=self.first_token_time,
        )
        self.next_seq += 1
        return chunk
