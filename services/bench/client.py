"""One streamed request to an OpenAI-compatible server, timed the way `vllm bench serve` times it.

`start` is read just before the POST. TTFT is the time to the first SSE message with a non-empty `choices`
array (even if its text is empty); every later such message adds one ITL sample (per chunk, not per token);
E2E ends at the last such message, so the trailing usage chunk does not count. The output length is the
usage's `completion_tokens` (requested with `stream_options.include_usage`; servers that attach usage to the
finish chunk work too), else the number of token-bearing chunks. A request succeeds when the server answered
200, streamed at least one token and closed the stream with `data: [DONE]`; an error body inside the stream,
a dropped connection or a timeout is a failure with its reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from services.bench.workloads import Prompt

Api = Literal["completions", "chat"]
ERROR_TEXT_LIMIT = 300


@dataclass
class RequestResult:
    index: int
    input_len: int | None  # prompt tokens as made by the client (None: unknown until the usage arrives)
    output_len: int  # the max_tokens asked for
    scheduled: float  # seconds after the run's start, from the arrival schedule
    sent: float = 0.0  # when the POST went out (later than `scheduled` when queued by --max-concurrency)
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    prompt_tokens: int | None = None  # the server's count, from usage
    output_tokens: int = 0
    usage_reported: bool = False


def base_url(url: str) -> str:
    """`http://host:port`, `…/`, `…/v1` and `…/v1/` all name the same server."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class OpenAIClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str,
        *,
        api: Api = "completions",
        api_key: str | None = None,
        ignore_eos: bool = True,
        extra_body: dict[str, Any] | None = None,
        timeout: float = 600.0,
    ):
        self.session = session
        self.base = base_url(url)
        self.model = model
        self.api = api
        self.endpoint = f"{self.base}/v1/{'chat/completions' if api == 'chat' else 'completions'}"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.ignore_eos = ignore_eos
        self.extra_body = extra_body or {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    def payload(self, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            if not isinstance(prompt, str):
                raise ValueError("the chat API needs a text prompt")
            body["messages"] = [{"role": "user", "content": prompt}]
            body["max_completion_tokens"] = max_tokens
        else:
            body["prompt"] = prompt
            body["max_tokens"] = max_tokens
        if self.ignore_eos:
            body["ignore_eos"] = True  # exact output lengths; strict servers reject it (--no-ignore-eos)
        body.update(self.extra_body)
        return body

    async def send(self, result: RequestResult, prompt: Prompt, run_start: float) -> RequestResult:
        """POST one streamed request and fill `result` in place (also on failure)."""
        body = self.payload(prompt, result.output_len)
        start = time.perf_counter()
        result.sent = start - run_start
        try:
            async with self.session.post(
                self.endpoint, json=body, headers=self.headers, timeout=self.timeout
            ) as response:
                if response.status != 200:
                    text = (await response.text())[:ERROR_TEXT_LIMIT]
                    result.error = f"HTTP {response.status}: {text}"
                    return result
                await self._read_stream(response, result, start)
        # ValueError: aiohttp's limit on one SSE line ("Chunk too big").
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT] or type(exc).__name__
        return result

    async def _read_stream(
        self, response: aiohttp.ClientResponse, result: RequestResult, start: float
    ) -> None:
        last_token = start
        chunks = 0
        done = False
        async for raw in response.content:
            now = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, SSE comments, event names
            data = line[len(b"data:") :].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                message = json.loads(data)
            except json.JSONDecodeError:
                result.error = f"malformed SSE data: {data[:100]!r}"
                return
            if not isinstance(message, dict):
                result.error = f"unexpected SSE data: {data[:100]!r}"
                return
            if "error" in message:
                error = message["error"]
                detail = error.get("message", error) if isinstance(error, dict) else error
                result.error = f"stream error: {detail}"[:ERROR_TEXT_LIMIT]
                return
            if message.get("choices"):
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last_token)
                last_token = now
                chunks += 1
            usage = message.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                result.output_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    result.prompt_tokens = int(usage["prompt_tokens"])
                result.usage_reported = True
        if not done:
            result.error = "stream ended without [DONE]"
        elif chunks == 0:
            result.error = "no token in the stream"
        else:
            result.e2e = last_token - start
            if not result.usage_reported:
                result.output_tokens = chunks
            result.success = True


async def first_model(session: aiohttp.ClientSession, url: str, api_key: str | None) -> str:
    """The first model id /v1/models lists (what `vllm bench serve` does when --model is not given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(
        f"{base_url(url)}/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {response.status}: {(await response.text())[:200]}")
        data = (await response.json()).get("data") or []
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise RuntimeError("GET /v1/models listed no model; pass --model")
        return str(data[0]["id"])
