"""OpenAI response shapes: completion and chat chunks (SSE) and full responses, usage and logprobs. Pure.

Streams follow vLLM: one choice per chunk, a chat choice's first chunk carries `role` with its first content,
the last carries `finish_reason`, and with `stream_options.include_usage` one more chunk has `choices: []`
and the usage (`vllm bench serve` takes output lengths from it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from services.router.token_text import TokenText
from shared.messages import TokenLogprob

DONE = b"data: [DONE]\n\n"
# JSON has no -inf; vLLM reports an impossible token's logprob as -9999.0.
MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB if value != math.inf else 0.0


class LogprobFormatter:
    """Both logprob formats, with token strings and bytes from the tokenizer."""

    def __init__(self, token_text: TokenText, top_n: int):
        self._text = token_text
        self._top_n = top_n

    def completion(self, logprobs: Sequence[TokenLogprob], text_offset: int) -> tuple[dict[str, Any], int]:
        """Completions' `{tokens, token_logprobs, top_logprobs, text_offset}` and the offset after them."""
        tokens, values, tops, offsets = [], [], [], []
        for entry in logprobs:
            token = self._text.text(entry.token_id)
            top = {
                self._text.text(token_id): _logprob(value)
                for token_id, value in zip(entry.top_ids[: self._top_n], entry.top_logprobs, strict=False)
            }
            top.setdefault(token, _logprob(entry.logprob))  # vLLM always lists the sampled token too
            tokens.append(token)
            values.append(_logprob(entry.logprob))
            tops.append(top)
            offsets.append(text_offset)
            text_offset += len(token)
        body = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
        return body, text_offset

    def chat(self, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Chat's `{content: [{token, logprob, bytes, top_logprobs}]}`."""
        content = []
        for entry in logprobs:
            top = [
                self._item(token_id, value)
                for token_id, value in zip(entry.top_ids[: self._top_n], entry.top_logprobs, strict=False)
            ]
            content.append({**self._item(entry.token_id, entry.logprob), "top_logprobs": top})
        return {"content": content}

    def _item(self, token_id: int, value: float) -> dict[str, Any]:
        return {
            "token": self._text.text(token_id),
            "logprob": _logprob(value),
            "bytes": list(self._text.bytes(token_id)),
        }


def completion_chunk(
    response_id: str,
    created: int,
    model: str,
    *,
    index: int,
    text: str,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    *,
    index: int,
    delta: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def response_body(
    response_id: str,
    obj: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, int],
) -> dict[str, Any]:
    """The envelope shared by full responses and the final usage chunk (which has `choices: []`)."""
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_body,
    }


def usage_chunk(
    response_id: str, obj: str, created: int, model: str, usage_body: dict[str, int]
) -> dict[str, Any]:
    return response_body(response_id, obj, created, model, [], usage_body)


def completion_response(
    response_id: str, created: int, model: str, choices: list[dict[str, Any]], usage_body: dict[str, int]
) -> dict[str, Any]:
    return response_body(response_id, "text_completion", created, model, choices, usage_body)


def chat_response(
    response_id: str, created: int, model: str, choices: list[dict[str, Any]], usage_body: dict[str, int]
) -> dict[str, Any]:
    return response_body(response_id, "chat.completion", created, model, choices, usage_body)


def model_card(model_id: str, created: int, root: str, max_model_len: int | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "ecoserve",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
    }


def models_list(card: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": [card]}
