"""Per-endpoint response shaping: ChoiceUpdates → SSE chunks, or accumulated into one full response.

A shaper keeps the per-choice state the formats need: whether a chat choice has sent its `role` yet, the
running `text_offset` of completion logprobs, and the text and logprobs gathered for a non-streaming answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from services.router import openai_format as fmt
from services.router.choice import ChoiceUpdate


@dataclass
class _Accumulated:
    texts: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Shaper(Protocol):
    chunk_object: str  # the `object` of this endpoint's stream chunks

    def chunk(self, update: ChoiceUpdate) -> dict[str, Any]: ...

    def add(self, update: ChoiceUpdate) -> None: ...

    def response(self, usage: dict[str, int]) -> dict[str, Any]: ...


class _Base:
    def __init__(
        self,
        response_id: str,
        created: int,
        model: str,
        num_choices: int,
        logprobs: fmt.LogprobFormatter | None,
    ):
        self.response_id = response_id
        self.created = created
        self.model = model
        self._logprobs = logprobs
        self._choices = [_Accumulated() for _ in range(num_choices)]

    def _accumulate(self, update: ChoiceUpdate) -> _Accumulated:
        acc = self._choices[update.index]
        acc.texts.append(update.text)
        if update.logprobs:
            acc.logprobs.extend(update.logprobs)
        if update.finish_reason is not None:
            acc.finish_reason, acc.stop_reason = update.finish_reason, update.stop_reason
        return acc


class CompletionShaper(_Base):
    chunk_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._offsets = [0] * len(self._choices)

    def _logprobs_for(self, update: ChoiceUpdate) -> dict[str, Any] | None:
        if self._logprobs is None or update.logprobs is None:
            return None
        body, self._offsets[update.index] = self._logprobs.completion(
            update.logprobs, self._offsets[update.index]
        )
        return body

    def chunk(self, update: ChoiceUpdate) -> dict[str, Any]:
        return fmt.completion_chunk(
            self.response_id,
            self.created,
            self.model,
            index=update.index,
            text=update.text,
            logprobs=self._logprobs_for(update),
            finish_reason=update.finish_reason,
            stop_reason=update.stop_reason,
        )

    def add(self, update: ChoiceUpdate) -> None:
        self._accumulate(update)

    def response(self, usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index, acc in enumerate(self._choices):
            logprobs = None
            if self._logprobs is not None:
                logprobs, _ = self._logprobs.completion(acc.logprobs, 0)
            choices.append(
                {
                    "index": index,
                    "text": "".join(acc.texts),
                    "logprobs": logprobs,
                    "finish_reason": acc.finish_reason,
                    "stop_reason": acc.stop_reason,
                }
            )
        return fmt.completion_response(self.response_id, self.created, self.model, choices, usage)


class ChatShaper(_Base):
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._role_sent = [False] * len(self._choices)

    def chunk(self, update: ChoiceUpdate) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._role_sent[update.index]:
            # The role rides with the first real content, never alone before a token exists: a role-only
            # chunk would make clients (vllm bench serve) record a fake time to first token.
            self._role_sent[update.index] = True
            delta["role"] = "assistant"
        if update.text or "role" in delta:
            delta["content"] = update.text
        logprobs = None
        if self._logprobs is not None and update.logprobs is not None:
            logprobs = self._logprobs.chat(update.logprobs)
        return fmt.chat_chunk(
            self.response_id,
            self.created,
            self.model,
            index=update.index,
            delta=delta,
            logprobs=logprobs,
            finish_reason=update.finish_reason,
            stop_reason=update.stop_reason,
        )

    def add(self, update: ChoiceUpdate) -> None:
        self._accumulate(update)

    def response(self, usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index, acc in enumerate(self._choices):
            logprobs = self._logprobs.chat(acc.logprobs) if self._logprobs is not None else None
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": "".join(acc.texts)},
                    "logprobs": logprobs,
                    "finish_reason": acc.finish_reason,
                    "stop_reason": acc.stop_reason,
                }
            )
        return fmt.chat_response(self.response_id, self.created, self.model, choices, usage)
