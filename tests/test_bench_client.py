"""The streaming client and the run driver against a scripted in-process SSE server: what is sent, how the
stream is timed (vLLM's rules), how failures are classified, and --max-concurrency."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from services.bench.client import OpenAIClient, RequestResult, base_url, first_model
from services.bench.prompts import PromptMaker
from services.bench.runner import execute, plan_run
from services.bench.workloads import load_workload

USAGE_DELAY = 0.3


def chunk(text: str | None, usage: dict | None = None) -> bytes:
    body: dict = {
        "object": "text_completion",
        "choices": [] if text is None else [{"index": 0, "text": text}],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


class Scripted:
    """A server whose behaviour is chosen by the request's `model`."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        model = body["model"]
        if model == "busy":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            n = body.get("max_tokens") or body.get("max_completion_tokens")
            if model == "slow":
                await asyncio.sleep(0.1)
            await response.write(b": keep-alive comment\n\n")
            for i in range(n):
                last = i == n - 1
                if model == "usage-on-finish" and last:
                    await response.write(chunk("t", {"prompt_tokens": 3, "completion_tokens": n}))
                else:
                    await response.write(chunk("" if i == 0 else "t"))  # an empty first text still counts
                if model == "error-midway" and i == 1:
                    await response.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
                    break
            if model == "usage-late":
                await asyncio.sleep(USAGE_DELAY)
            if model not in ("usage-on-finish", "no-usage"):
                await response.write(chunk(None, {"prompt_tokens": 3, "completion_tokens": n}))
            if model != "no-done":
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[str, Scripted]]:
    scripted = Scripted()
    app = web.Application()
    app.router.add_post("/v1/completions", scripted.completions)
    app.router.add_post("/v1/chat/completions", scripted.completions)
    app.router.add_get("/v1/models", scripted.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1/", scripted
    finally:
        await runner.cleanup()


async def send(url: str, model: str, tokens: int = 5, **kwargs) -> tuple[RequestResult, float]:
    async with aiohttp.ClientSession() as session:
        client = OpenAIClient(session, url, model, **kwargs)
        start = time.perf_counter()
        result = await client.send(RequestResult(0, 3, tokens, 0.0), [1, 2, 3], start)
        return result, time.perf_counter() - start


def test_base_url_normalisation():
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert base_url(url) == "http://h:1"


async def test_payload_and_timing_follow_vllm(server):
    url, scripted = server
    result, wall = await send(url, "usage-late", tokens=5, api_key="k", extra_body={"top_k": 1})
    assert result.success, result.error
    body = scripted.bodies[-1]
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 5 and body["temperature"] == 0.0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["top_k"] == 1
    assert (result.output_tokens, result.prompt_tokens, result.usage_reported) == (5, 3, True)
    assert len(result.itl) == 4  # one sample per token chunk after the first (the empty first text counts)
    assert 0 < result.ttft <= result.e2e
    assert result.e2e == pytest.approx(result.ttft + sum(result.itl))
    # E2E ends at the last token chunk: the usage chunk, sent USAGE_DELAY later, does not count.
    assert result.e2e + USAGE_DELAY <= wall


async def test_chat_payload_and_no_ignore_eos(server):
    url, scripted = server
    async with aiohttp.ClientSession() as session:
        client = OpenAIClient(session, url, "plain", api="chat", ignore_eos=False)
        result = await client.send(RequestResult(0, None, 3, 0.0), "hello", time.perf_counter())
    assert result.success and result.output_tokens == 3
    body = scripted.bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["max_completion_tokens"] == 3 and "ignore_eos" not in body and "prompt" not in body


async def test_usage_on_the_finish_chunk_and_missing_usage(server):
    url, _ = server
    on_finish, _ = await send(url, "usage-on-finish", tokens=4)
    assert on_finish.success and on_finish.usage_reported and on_finish.output_tokens == 4
    assert len(on_finish.itl) == 3
    counted, _ = await send(url, "no-usage", tokens=6)
    assert counted.success and not counted.usage_reported and counted.output_tokens == 6  # chunks counted


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("busy", "HTTP 503: "),
        ("error-midway", "stream error: engine died"),
        ("no-done", "stream ended without [DONE]"),
    ],
)
async def test_failures_carry_their_reason(server, model, error):
    url, _ = server
    result, _ = await send(url, model)
    assert not result.success and result.error.startswith(error)


async def test_unreachable_server_is_a_failure_not_an_exception():
    async with aiohttp.ClientSession() as session:
        client = OpenAIClient(session, "http://127.0.0.1:1", "m", timeout=5)
        result = await client.send(RequestResult(0, 1, 1, 0.0), [1], time.perf_counter())
    assert not result.success and "Connect" in result.error


async def test_first_model(server):
    url, _ = server
    async with aiohttp.ClientSession() as session:
        assert await first_model(session, url, None) == "scripted-model"


@pytest.mark.parametrize("limit", [None, 1])
async def test_run_sends_everything_and_honours_max_concurrency(server, limit):
    url, scripted = server
    run = plan_run(
        load_workload("alpaca"), PromptMaker("ids"), n=4, rate=float("inf"), burstiness=1.0, seed=0
    )
    async with aiohttp.ClientSession() as session:
        await execute(OpenAIClient(session, url, "slow"), run, max_concurrency=limit, progress=False)
    assert all(r.success for r in run.results)
    assert [r.output_tokens for r in run.results] == [r.output_len for r in run.results]
    assert sorted(b["prompt"] for b in scripted.bodies) == sorted(run.prompts)
    if limit == 1:
        assert scripted.max_in_flight == 1
        sent = sorted(r.sent for r in run.results)
        assert all(b - a >= 0.1 for a, b in itertools.pairwise(sent))  # each waited for a slot
    else:
        assert scripted.max_in_flight > 1
    assert run.duration >= max(r.sent + r.e2e for r in run.results)
