"""One choice of a response: its token chunks turned into text, stop strings applied, and its finish.

Stop strings are the router's job (the engine only sees token ids): when one completes, the text is cut, the
tokens after it are dropped (tokens, logprobs and usage all end at the token that completed it, as in vLLM),
and the caller aborts the request on its instance. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.text.detokenizer import IncrementalDetokenizer
from shared.messages import TokenChunk, TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChoiceUpdate:
    """What one token chunk adds to a choice."""

    index: int
    text: str
    token_ids: Sequence[int]
    logprobs: Sequence[TokenLogprob] | None  # one per token id when logprobs were asked for
    finish_reason: str | None = None  # set on the choice's last update
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    stopped_by_router: bool = False  # a stop string matched: the instance is still generating


class ChoiceState:
    def __init__(
        self,
        index: int,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self.index = index
        self.prompt_tokens = len(prompt_token_ids)
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=skip_special_tokens,
            stop=stop,
            include_stop_str_in_output=include_stop_str_in_output,
        )
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self._detokenizer.token_ids)

    def apply(self, chunk: TokenChunk) -> ChoiceUpdate | None:
        """The update for `chunk`; None once the choice has finished (chunks still in flight are dropped)."""
        if self.finished:
            return None
        before = self.completion_tokens
        delta = self._detokenizer.push(chunk.token_ids)
        text = delta.text
        finish_reason: str | None = None
        stop_reason: int | str | None = None
        stopped_by_router = False
        if delta.stop_string is not None:
            finish_reason, stop_reason, stopped_by_router = "stop", delta.stop_string, not chunk.finished
        elif chunk.finished:
            text += self._detokenizer.flush()
            if self._detokenizer.stop_string is not None:  # completed by the held-back tail
                finish_reason, stop_reason = "stop", self._detokenizer.stop_string
            else:
                finish_reason, stop_reason = chunk.finish_reason or "stop", chunk.stop_reason
        consumed = self.completion_tokens - before
        token_ids = chunk.token_ids if consumed == len(chunk.token_ids) else chunk.token_ids[:consumed]
        logprobs = chunk.logprobs[:consumed] if chunk.logprobs is not None else None
        self.finish_reason = finish_reason
        return ChoiceUpdate(
            index=self.index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            stopped_by_router=stopped_by_router,
        )
