"""Offline batch generation: the engine without services, for users and for checks.

    llm = LLM(model="path/to/hf-folder", dtype="float32")
    results = llm.generate([{"prompt": "Hello", "max_tokens": 8, "temperature": 0}])

and `ecoserve generate --model DIR --input prompts.jsonl --output out.jsonl`, one JSON object per line with
vLLM/OpenAI names: `prompt` (text) or `prompt_token_ids`, plus any sampling parameter (`max_tokens`,
`temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`, `logprobs`, ...).
Each output line has `token_ids`, `text`, `finish_reason`, `stop_reason`, `prompt_tokens`,
`completion_tokens` (and `logprobs` when asked), in input order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from services.instance.engine.llm_engine import EngineConfig, LLMEngine
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.engine.sequence import TokenLogprobs
from services.instance.models.loader import load_tokenizer, resolve_model_path
from services.text.detokenizer import IncrementalDetokenizer

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}
_REQUEST_NAMES = {"id", "prompt", "prompt_token_ids"}


class InputError(ValueError):
    """A request line is invalid; the message names the line (when known) and the field."""


@dataclass
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
        config: EngineConfig | None = None,
    ):
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        folder = resolve_model_path(None if model is None else str(model), dtype=dtype)
        self.tokenizer = load_tokenizer(folder)
        self.engine = LLMEngine.from_pretrained(folder, dtype=dtype, device=device, config=config)

    def prepare(self, request: dict[str, Any], index: int = 0) -> PreparedRequest:
        """Validate one request object; raise InputError naming the offending field."""
        if not isinstance(request, dict):
            raise InputError(f"request {index}: must be a JSON object")
        unknown = sorted(set(request) - _PARAM_NAMES - _REQUEST_NAMES)
        if unknown:
            raise InputError(f"request {index}: {unknown[0]}: unknown field")
        has_text, has_ids = "prompt" in request, "prompt_token_ids" in request
        if has_text == has_ids:
            raise InputError(f"request {index}: prompt: give exactly one of 'prompt' or 'prompt_token_ids'")
        if has_text:
            if not isinstance(request["prompt"], str):
                raise InputError(f"request {index}: prompt: must be a string")
            ids = self.tokenizer(request["prompt"])["input_ids"]
        else:
            ids = request["prompt_token_ids"]
        try:
            params = SamplingParams.from_dict({k: v for k, v in request.items() if k in _PARAM_NAMES})
            request_id = str(request.get("id", index))
            self.engine.validate_request(f"check-{request_id}", ids, params)
        except (ParameterError, TypeError) as exc:
            raise InputError(f"request {index}: {exc}") from exc
        return PreparedRequest(request_id, list(ids), params)

    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run every request to completion; results in input order. All requests are validated first, so
        a bad one fails the batch before any compute."""
        prepared = [self.prepare(r, i) for i, r in enumerate(requests)]
        return self.run(prepared)

    def run(self, prepared: list[PreparedRequest]) -> list[dict[str, Any]]:
        engine = self.engine
        states: dict[str, _RequestState] = {}
        now = time.monotonic()
        for i, req in enumerate(prepared):
            key = f"{i}:{req.request_id}"
            states[key] = _RequestState(
                req,
                IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids=req.prompt_token_ids,
                    skip_special_tokens=req.params.skip_special_tokens,
                    stop=req.params.stop,
                    include_stop_str_in_output=req.params.include_stop_str_in_output,
                ),
            )
            engine.add_request(key, req.prompt_token_ids, req.params, arrival_time=now)
        pending = set(states)
        while pending:
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"engine idle with {len(pending)} requests unfinished")
            for out in engine.step():
                state = states[out.request_id]
                if out.new_logprobs:
                    state.logprobs.extend(out.new_logprobs)
                delta = state.detok.push(out.new_token_ids)
                state.text += delta.text
                if delta.stop_string is not None and not out.finished:
                    engine.abort_request(out.request_id)
                if delta.stop_string is not None:
                    state.finish("stop", delta.stop_string)
                elif out.finished:
                    state.text += state.detok.flush()
                    state.finish(out.finish_reason, out.stop_reason)
                if state.done:
                    pending.discard(out.request_id)
        return [states[key].result(self.tokenizer) for key in states]


class _RequestState:
    def __init__(self, request: PreparedRequest, detok: IncrementalDetokenizer):
        self.request = request
        self.detok = detok
        self.logprobs: list[TokenLogprobs] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.done = False

    def finish(self, reason: str | None, stop_reason: int | str | None) -> None:
        self.finish_reason, self.stop_reason, self.done = reason, stop_reason, True

    @property
    def token_ids(self) -> list[int]:
        # the detokenizer ends them at the token that completed a stop string
        return self.detok.token_ids

    def result(self, tokenizer) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.request.request_id,
            "prompt_tokens": len(self.request.prompt_token_ids),
            "completion_tokens": len(self.token_ids),
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
        }
        if self.request.params.logprobs is not None:
            kept = self.logprobs[: len(self.token_ids)]
            out["logprobs"] = [_logprob_json(lp, tokenizer) for lp in kept]
        return out


def _logprob_json(lp: TokenLogprobs, tokenizer) -> dict[str, Any]:
    return {
        "token_id": lp.token_id,
        "token": tokenizer.convert_ids_to_tokens(lp.token_id),
        "logprob": lp.logprob,
        "rank": lp.rank,
        "top_logprobs": [{"token_id": t, "logprob": v} for t, v in lp.top],
    }


def read_jsonl(path: str | Path) -> list[Any]:
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
    return items


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
