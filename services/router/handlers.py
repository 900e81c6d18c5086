"""POST /v1/completions and /v1/chat/completions: validate, tokenize, submit, then stream (SSE) or answer.

Errors found before submission are plain HTTP errors (400/404/429/503 JSON). Once an SSE stream has begun
its status is 200, so a later failure (instance lost, lost chunks) is sent as a `data: {"error": …}` event
followed by `[DONE]`, as vLLM does. A client that goes away (write failure, handler cancellation, or the
transport seen closed) gets its requests aborted on their instances.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from services.router import openai_format as fmt
from services.router.errors import APIError, bad_request, error_body
from services.router.generation import ClientGone, Generation, GenerationFailed
from services.router.parsing import ParsedRequest, check_sampling, parse_chat, parse_completion
from services.router.prompts import chat_prompt_ids, check_token_ids, completion_prompt_ids, fit_max_tokens
from services.router.runtime import RUNTIME, RouterRuntime
from services.router.shapers import ChatShaper, CompletionShaper, Shaper

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first" (only ever seen in access logs)
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not buffer tokens
}


async def read_json(request: web.Request) -> Any:
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise bad_request(f"Content-Type must be application/json, got {content_type!r}")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {error}"[:300]) from None
    if _SURROGATE_ESCAPE.search(raw):  # only an escape can smuggle one in: raw bytes must be valid UTF-8
        where = _unpaired_surrogate(body, "")
        if where is not None:
            param = where or None
            raise bad_request(
                f"'{where or 'the body'}' holds an unpaired UTF-16 surrogate escape, which is not text", param
            )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(value: Any, path: str) -> str | None:
    """The path (`messages[0].content`) of the first string holding a lone surrogate, which no tokenizer or
    wire encoder accepts; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unpaired_surrogate(key, path) or _unpaired_surrogate(
                item, f"{path}.{key}" if path else key
            )
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unpaired_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


async def handle_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion)


async def handle_chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat)


async def _tokenized(rt: RouterRuntime, parsed: ParsedRequest, body_bytes: int) -> list[list[int]]:
    """The prompts' token ids. A long text is tokenized (and templated) off the event loop, one at a time:
    ~1 s per MB, which would otherwise stall every other stream."""
    if body_bytes < OFF_LOOP_TOKENIZE_BYTES:
        return _prompt_ids(rt, parsed)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, _prompt_ids, rt, parsed)


OFF_LOOP_TOKENIZE_BYTES = 64 * 1024
# One worker: tokenizations queue behind each other instead of running many threads against one tokenizer.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecoserve-tokenize")


def _prompt_ids(rt: RouterRuntime, parsed: ParsedRequest) -> list[list[int]]:
    tokenizer = rt.model.tokenizer
    if parsed.kind == "chat":
        return [chat_prompt_ids(tokenizer, parsed)]
    return completion_prompt_ids(tokenizer, parsed, rt.model.vocab_size)


async def _engine_sampling(
    rt: RouterRuntime, parsed: ParsedRequest, prompt_ids: list[list[int]]
) -> list[dict[str, Any]]:
    """Per prompt: the engine's sampling fields, with max_tokens fitted to the context window."""
    snapshot = await rt.cluster.snapshot(stale_ok=True)  # the context length changes only with a broadcast
    max_model_len = snapshot.max_model_len() or rt.model.config_max_model_len
    result = []
    for ids in prompt_ids:
        params = check_sampling(parsed, fit_max_tokens(parsed, len(ids), max_model_len)).to_dict()
        # Stop strings are matched on the text by the router; the engine only gets token ids.
        params["stop"] = []
        params["include_stop_str_in_output"] = False
        result.append(params)
    return result


async def _generate(request: web.Request, parse: Callable[[Any], ParsedRequest]) -> web.StreamResponse:
    arrival_time, arrival_perf = time.time(), time.perf_counter()  # latencies count from here, as vLLM's
    parsed = parse(await read_json(request))
    rt = request.app[RUNTIME]
    if not rt.model.matches(parsed.model):
        raise APIError(
            404, f"The model `{parsed.model}` does not exist", param="model", code="model_not_found"
        )
    check_token_ids(parsed.sampling.get("stop_token_ids", []), rt.model.vocab_size, "stop_token_ids")
    prompt_ids = await _tokenized(rt, parsed, len(await request.read()))  # read() is cached: no copy
    sampling = await _engine_sampling(rt, parsed, prompt_ids)

    response_id = ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + uuid.uuid4().hex
    shaper_type = ChatShaper if parsed.kind == "chat" else CompletionShaper
    logprobs = fmt.LogprobFormatter(rt.token_text, parsed.logprobs) if parsed.logprobs is not None else None
    shaper = shaper_type(response_id, int(arrival_time), rt.model.name, parsed.num_choices, logprobs)
    generation = Generation(
        rt,
        parsed,
        response_id=response_id,
        prompt_ids=prompt_ids,
        sampling=sampling,
        arrival_time=arrival_time,
        arrival_perf=arrival_perf,
        is_disconnected=lambda: request.transport is None or request.transport.is_closing(),
    )
    in_flight = rt.metrics.in_flight.labels(model_name=rt.model.name)
    in_flight.inc()
    close_reason = "request ended"
    try:
        await generation.start()
        if parsed.stream:
            return await _stream(request, parsed, generation, shaper)
        return await _respond(generation, shaper)
    except (ClientGone, ConnectionResetError):  # ConnectionResetError: gone before the stream began
        close_reason = "client disconnected"
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except asyncio.CancelledError:  # aiohttp cancels the handler on disconnect (with handler_cancellation)
        close_reason = "client disconnected"
        raise
    finally:
        await generation.close(close_reason)  # aborts whatever is still generating; a no-op when all finished
        in_flight.dec()


async def _respond(generation: Generation, shaper: Shaper) -> web.Response:
    try:
        while (update := await generation.next_update()) is not None:
            shaper.add(update)
    except GenerationFailed as failure:
        await generation.close("request failed")
        raise APIError(failure.status, failure.message, code="generation_failed") from None
    usage = fmt.usage(generation.prompt_tokens, generation.completion_tokens)
    return web.json_response(shaper.response(usage), dumps=_dumps)


async def _stream(
    request: web.Request, parsed: ParsedRequest, generation: Generation, shaper: Shaper
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            while (update := await generation.next_update()) is not None:
                await response.write(fmt.sse(shaper.chunk(update)))
            if parsed.include_usage:
                usage = fmt.usage(generation.prompt_tokens, generation.completion_tokens)
                chunk = fmt.usage_chunk(
                    shaper.response_id, shaper.chunk_object, shaper.created, shaper.model, usage
                )
                await response.write(fmt.sse(chunk))
        except GenerationFailed as failure:
            await generation.close("request failed")
            await response.write(
                fmt.sse(error_body(failure.status, failure.message, code="generation_failed"))
            )
        await response.write(fmt.DONE)
        await response.write_eof()
    except (ClientGone, ConnectionResetError):
        # The response has begun, so it is returned as is; nothing more can reach the client.
        await generation.close("client disconnected")
    return response


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
