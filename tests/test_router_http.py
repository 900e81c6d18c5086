"""The router over real NATS and Redis, with the test playing coordinator and instance on the real wire.

Covers the OpenAI surface end to end: completions and chat, streaming and not, usage chunks, stop strings,
aborts on disconnect, failures after submission (lost instance, lost chunks), error statuses, auth, models,
health, metrics, concurrency, and two routers side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from openai import AsyncOpenAI
from router_harness import FakeCluster, Plan, eventually, joined_text, read_sse, serve_router
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from services.router import app as app_module
from shared import keys, subjects
from shared.config import RouterConfig
from shared.messages import (
    ClusterChanged,
    ErrorReply,
    InstanceInfo,
    InstanceLost,
    InstanceStatus,
    SubmitRequest,
)
from shared.wire import encode

TEXT = "def stream(tokens): return the quick brown fox"
MODEL = "llama-tiny"  # the tiny model folder's name: the served model name by default


@pytest.fixture(scope="session")
def tokenizer(tiny_models: dict[str, Path]) -> PreTrainedTokenizerBase:
    return PreTrainedTokenizerFast.from_pretrained(tiny_models["llama"])


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def config(nats_server, redis_server, ecoserve_prefix: str, tiny_models: dict[str, Path]) -> RouterConfig:
    return RouterConfig(
        nats_url=nats_server.url,
        redis_url=redis_server.url,
        prefix=ecoserve_prefix,
        router_id="router-a",
        model=str(tiny_models["llama"]),
    )


@pytest_asyncio.fixture
async def cluster(nats_client: NATS, ecoserve_prefix: str) -> AsyncIterator[FakeCluster]:
    fake = await FakeCluster(nats_client, ecoserve_prefix).start(instance_ids=("inst-a", "inst-b"))
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def sticky_cluster_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routers started after this keep their view of Redis until a ClusterChanged drops it, so a test sees
    the broadcast work rather than the cache expiring."""
    monkeypatch.setattr(app_module, "CLUSTER_CACHE_SECONDS", 600.0)


@pytest_asyncio.fixture
async def router(config: RouterConfig, tokenizer: PreTrainedTokenizerBase) -> AsyncIterator[str]:
    async with serve_router(config, tokenizer=tokenizer) as url:
        yield url


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def plan_text(tokenizer: PreTrainedTokenizerBase, text: str = TEXT, **kwargs) -> Plan:
    return Plan(token_ids=token_ids(tokenizer, text), **kwargs)


async def post(http: aiohttp.ClientSession, url: str, body: dict, **kwargs) -> tuple[int, dict]:
    async with http.post(url, json=body, **kwargs) as response:
        return response.status, await response.json()


# ---- completions and chat, streaming and not ---------------------------------------------------------------


async def test_completion_without_streaming(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer)
    status, body = await post(
        http, f"{router}/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 20}
    )
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length" and choice["index"] == 0
    prompt_len = len(token_ids(tokenizer, "hello"))
    n_out = len(token_ids(tokenizer, TEXT))
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": n_out,
        "total_tokens": prompt_len + n_out,
    }
    (request,) = cluster.submits
    assert request.prompt_token_ids == token_ids(tokenizer, "hello")
    assert request.sampling["max_tokens"] == 20 and request.sampling["stop"] == []
    assert request.reply_subject == subjects.router_tokens(cluster.prefix, "router-a")
    assert request.router_id == "router-a" and request.model == MODEL and request.stream is False


async def test_streamed_completion_with_usage_and_no_chunk_before_the_first_token(
    router, http, cluster, tokenizer
):
    cluster.planner = lambda request: plan_text(tokenizer, first_delay=0.3, per_chunk=2, finish_reason="stop")
    body = {"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    async with http.post(f"{router}/v1/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1].data == "[DONE]"
    usage_event = events[-2].data
    assert usage_event["choices"] == [] and usage_event["object"] == "text_completion"
    n_out = len(token_ids(tokenizer, TEXT))
    assert usage_event["usage"]["completion_tokens"] == n_out
    token_events = events[:-2]
    # The first chunk with choices comes after the (delayed) first token and carries its text.
    assert token_events[0].at - started >= 0.3
    assert token_events[0].data["choices"][0]["text"] == tokenizer.decode(token_ids(tokenizer, TEXT)[:2])
    assert all(len(e.data["choices"]) == 1 for e in token_events)
    assert [e.data["choices"][0]["finish_reason"] for e in token_events][-1] == "stop"
    assert all(e.data["choices"][0]["finish_reason"] is None for e in token_events[:-1])
    assert joined_text(events) == TEXT


async def test_stream_without_include_usage_sends_no_usage_chunk(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer)
    async with http.post(f"{router}/v1/completions", json={"prompt": "hi", "stream": True}) as response:
        events = await read_sse(response)
    assert all(e.data == "[DONE]" or e.data["choices"] for e in events)
    assert joined_text(events) == TEXT


async def test_chat_streams_role_with_the_first_content(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, first_delay=0.2)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    body = {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{router}/v1/chat/completions", json=body) as response:
        events = await read_sse(response)
    chunks = [e.data for e in events if e.data != "[DONE]" and e.data["choices"]]
    first = chunks[0]["choices"][0]["delta"]
    first_token_text = tokenizer.decode(token_ids(tokenizer, TEXT)[:1])
    assert first == {"role": "assistant", "content": first_token_text}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert joined_text(events) == TEXT
    assert events[-2].data["choices"] == [] and events[-2].data["object"] == "chat.completion.chunk"
    # The prompt is the tokenizer's chat template, tokenized once (no special tokens added twice).
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert cluster.submits[0].prompt_token_ids == token_ids(tokenizer, rendered)


async def test_chat_without_streaming_and_default_max_tokens(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, finish_reason="stop")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "top_k": 5}
    status, response = await post(http, f"{router}/v1/chat/completions", body)
    assert status == 200, response
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert response["choices"][0]["finish_reason"] == "stop"
    sampling = cluster.submits[0].sampling
    prompt_len = len(cluster.submits[0].prompt_token_ids)
    assert sampling["max_tokens"] == 4096 - prompt_len  # the rest of the context (config.json)
    assert sampling["ignore_eos"] is True and sampling["top_k"] == 5


async def test_tokens_arriving_before_the_ack_are_kept(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, tokens_before_ack=True)
    status, body = await post(http, f"{router}/v1/completions", {"prompt": "x"})
    assert status == 200 and body["choices"][0]["text"] == TEXT


async def test_multibyte_characters_stream_whole(router, http, cluster, tokenizer):
    text = "café 日本語 😀 naïve ☕ done"
    ids = token_ids(tokenizer, text)
    assert len(ids) > len(text.split())  # characters are split across tokens
    cluster.planner = lambda request: Plan(token_ids=ids)
    async with http.post(f"{router}/v1/completions", json={"prompt": "x", "stream": True}) as response:
        events = await read_sse(response)
    pieces = [e.data["choices"][0]["text"] for e in events if e.data != "[DONE]"]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


async def test_n_choices_get_their_own_seeds_and_indices(router, http, cluster, tokenizer):
    texts = {0: "first answer", 1: "second answer here"}
    cluster.planner = lambda request: plan_text(tokenizer, texts[int(request.request_id.rsplit("-", 1)[1])])
    body = {"prompt": "x", "n": 2, "seed": 7, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{router}/v1/completions", json=body) as response:
        events = await read_sse(response)
    assert joined_text(events, 0) == texts[0] and joined_text(events, 1) == texts[1]
    assert sorted(r.sampling["seed"] for r in cluster.submits) == [7, 8]
    completion = sum(len(token_ids(tokenizer, t)) for t in texts.values())
    assert events[-2].data["usage"]["completion_tokens"] == completion
    assert events[-2].data["usage"]["prompt_tokens"] == len(token_ids(tokenizer, "x"))  # counted once


async def test_logprobs_for_both_endpoints(router, http, cluster, tokenizer):
    text = "ok 😀"
    ids = token_ids(tokenizer, text)
    cluster.planner = lambda request: Plan(token_ids=ids, logprobs=True)
    status, body = await post(http, f"{router}/v1/completions", {"prompt": "x", "logprobs": 2})
    assert status == 200, body
    assert cluster.submits[-1].sampling["logprobs"] == 2
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [-0.25] * len(ids)
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert len(logprobs["top_logprobs"][0]) == 2
    offsets = [sum(len(tok) for tok in logprobs["tokens"][:i]) for i in range(len(ids))]
    assert logprobs["text_offset"] == offsets

    body = {
        "messages": [{"role": "user", "content": "x"}],
        "logprobs": True,
        "top_logprobs": 1,
        "max_tokens": 8,
    }
    status, response = await post(http, f"{router}/v1/chat/completions", body)
    assert status == 200, response
    content = response["choices"][0]["logprobs"]["content"]
    # Each token's bytes are its real bytes, even where it holds part of a character.
    assert b"".join(bytes(entry["bytes"]) for entry in content) == text.encode()
    assert all(len(entry["top_logprobs"]) == 1 for entry in content)


# ---- stop strings, aborts, failures after submission ---------------------------------------------------


async def test_stop_string_truncates_and_aborts_the_request(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, "alpha beta STOP gamma delta epsilon", delay=0.02)
    body = {"prompt": "x", "stop": ["STOP"], "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{router}/v1/completions", json=body) as response:
        events = await read_sse(response)
    assert joined_text(events) == "alpha beta "
    last_choice = [e for e in events if e.data != "[DONE]" and e.data["choices"]][-1].data["choices"][0]
    assert last_choice["finish_reason"] == "stop" and last_choice["stop_reason"] == "STOP"
    abort = await asyncio.wait_for(cluster.aborts.get(), 5)
    assert abort.request_ids == [cluster.submits[0].request_id] and abort.reason == "stop string"
    assert cluster.abort_subjects[0].endswith(".instance.inst-a.abort")
    # Usage ends at the token that completed the stop string.
    consumed = len(token_ids(tokenizer, "alpha beta STOP"))
    assert events[-2].data["usage"]["completion_tokens"] <= consumed + 1


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_disconnect_mid_stream_aborts_the_request(
    config, tokenizer, cluster, handler_cancellation
):
    # Without handler cancellation the router notices the closed transport itself; with it (how
    # `python -m services.router` runs) aiohttp cancels the handler.
    cluster.planner = lambda request: plan_text(tokenizer, "one two three", finish=False)
    async with (
        serve_router(config, tokenizer=tokenizer, handler_cancellation=handler_cancellation) as router,
        aiohttp.ClientSession() as session,
    ):
        response = await session.post(f"{router}/v1/completions", json={"prompt": "x", "stream": True})
        assert response.status == 200
        await response.content.readuntil(b"\n\n")  # one token arrived
        response.close()  # the client goes away while the instance is still generating
        abort = await asyncio.wait_for(cluster.aborts.get(), 5)
    assert abort.request_ids == [cluster.submits[0].request_id] and abort.reason == "client disconnected"


async def test_client_disconnect_while_waiting_aborts_a_non_streaming_request(router, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, finish=False)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(f"{router}/v1/completions", json={"prompt": "x"}))
        while not cluster.submits:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()  # closes the connection before any response
        await asyncio.gather(task, return_exceptions=True)
    abort = await asyncio.wait_for(cluster.aborts.get(), 5)
    assert abort.reason == "client disconnected"


async def test_instance_lost_ends_streams_with_an_error_event(router, http, cluster, tokenizer, nats_client):
    prefix = cluster.prefix
    cluster.planner = lambda request: plan_text(tokenizer, finish=False, instance_id="inst-b")
    async with http.post(f"{router}/v1/completions", json={"prompt": "x", "stream": True}) as response:
        first = await response.content.readuntil(b"\n\n")
        assert b'"choices"' in first
        lost = InstanceLost(instance_id="inst-b", reason="lease expired", time=time.time())
        await nats_client.publish(subjects.instance_lost(prefix), encode(lost))
        events = await read_sse(response)
    error = events[-2].data["error"]
    assert "inst-b" in error["message"] and "lease expired" in error["message"]
    assert events[-1].data == "[DONE]"
    assert cluster.aborts.empty()  # nothing to abort on a dead instance


async def test_instance_lost_fails_a_non_streaming_request_with_503(
    router, http, cluster, tokenizer, nats_client
):
    cluster.planner = lambda request: plan_text(tokenizer, finish=False)
    task = asyncio.create_task(post(http, f"{router}/v1/completions", {"prompt": "x"}))
    while not cluster.submits:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    lost = InstanceLost(instance_id="inst-a", reason="gone", time=time.time())
    await nats_client.publish(subjects.instance_lost(cluster.prefix), encode(lost))
    status, body = await asyncio.wait_for(task, 5)
    assert status == 503 and "inst-a" in body["error"]["message"]


async def test_a_gap_in_seq_ends_the_stream_with_an_error(router, http, cluster, tokenizer):
    n_out = len(token_ids(tokenizer, TEXT))
    cluster.planner = lambda request: plan_text(tokenizer, seqs=[0, 1, *range(3, n_out + 1)])
    async with http.post(f"{router}/v1/completions", json={"prompt": "x", "stream": True}) as response:
        events = await read_sse(response)
    assert "expected seq 2, got 3" in events[-2].data["error"]["message"]
    assert joined_text(events) == tokenizer.decode(token_ids(tokenizer, TEXT)[:2])
    abort = await asyncio.wait_for(cluster.aborts.get(), 5)  # the instance may still be generating it
    assert abort.reason == "request failed"


async def test_malformed_token_messages_are_dropped(router, http, cluster, tokenizer, nats_client, config):
    async def planner(request: SubmitRequest) -> Plan:
        await nats_client.publish(request.reply_subject, b"\xc1 not msgpack")
        await nats_client.publish(
            request.reply_subject, encode(ErrorReply(code="internal", message="wrong type"))
        )
        return plan_text(tokenizer)

    cluster.planner = planner
    status, body = await post(http, f"{router}/v1/completions", {"prompt": "x"})
    assert status == 200 and body["choices"][0]["text"] == TEXT


# ---- errors before submission ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "status", "retry_after"),
    [
        (ErrorReply(code="overloaded", message="queues full", retry_after=1.5), 429, "2"),
        (ErrorReply(code="unavailable", message="no ready instance", retry_after=3.0), 503, "3"),
        (ErrorReply(code="bad_request", message="top_k too large", field="top_k"), 400, None),
        (ErrorReply(code="internal", message="boom"), 500, None),
    ],
)
async def test_coordinator_errors_map_to_http(router, http, cluster, reply, status, retry_after):
    cluster.planner = lambda request: Plan(error=reply)
    async with http.post(f"{router}/v1/completions", json={"prompt": "x"}) as response:
        body = await response.json()
        assert response.status == status, body
        assert response.headers.get("Retry-After") == retry_after
    assert reply.message in body["error"]["message"]
    if reply.field:
        assert body["error"]["param"] == reply.field


async def test_no_coordinator_is_503(router, http):
    async with http.post(f"{router}/v1/completions", json={"prompt": "x"}) as response:
        body = await response.json()
        assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert "coordinator" in body["error"]["message"]


async def test_one_failed_submit_of_n_aborts_the_accepted_ones(router, http, cluster, tokenizer):
    def planner(request: SubmitRequest) -> Plan:
        if request.request_id.endswith("-1"):
            return Plan(error=ErrorReply(code="overloaded", message="full"))
        return plan_text(tokenizer, finish=False)

    cluster.planner = planner
    status, _ = await post(http, f"{router}/v1/completions", {"prompt": "x", "n": 2})
    assert status == 429
    abort = await asyncio.wait_for(cluster.aborts.get(), 5)
    assert abort.request_ids[0].endswith("-0") and abort.reason == "submit failed"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "", "max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [99999]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "x " * 10, "max_tokens": 4090}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        # Lone surrogates (legal JSON escapes, not text) reach neither the tokenizer nor the wire encoder.
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": ["ok", "\udc00"]}, "stop[1]"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi \ud83d"}]},
            "messages[0].content",
        ),
        # Beyond 64 bits, or not finite: nothing means that, and msgpack could not carry it.
        ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
        ("/v1/completions", {"prompt": "x", "top_k": 10**30}, "top_k"),
        ("/v1/completions", {"prompt": "x", "temperature": float("inf")}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 10**400}, "top_p"),
        # Every token is matched against every stop string on the event loop: bounded.
        ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(65)]}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": ["a" * 1025]}, "stop"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        # Long enough to be tokenized off the event loop; still too long for the context.
        ("/v1/completions", {"prompt": "word " * 20_000}, "prompt"),
    ],
)
async def test_bad_input_is_400_naming_the_field(router, http, cluster, path, body, param):
    status, response = await post(http, f"{router}{path}", body)
    assert status == 400, response
    assert response["error"]["param"] == param and response["error"]["type"] == "invalid_request_error"
    assert cluster.submits == []


async def test_an_emoji_escaped_as_a_surrogate_pair_is_text(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer)
    status, body = await post(
        http, f"{router}/v1/completions", {"prompt": "smile \U0001f600", "stop": ["\U0001f600"]}
    )
    assert status == 200, body
    assert len(cluster.submits) == 1


async def test_n_samples_from_the_largest_seed_stay_64_bit(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer)
    status, body = await post(http, f"{router}/v1/completions", {"prompt": "x", "n": 2, "seed": 2**63 - 1})
    assert status == 200, body
    assert sorted(s.sampling["seed"] for s in cluster.submits) == [-(2**63), 2**63 - 1]


async def test_malformed_requests_get_json_errors(router, http):
    async with http.post(
        f"{router}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
    async with http.post(
        f"{router}/v1/completions", data=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 400 and "Content-Type" in (await r.json())["error"]["message"]
    async with http.post(f"{router}/v1/completions", json=["a list"]) as r:
        assert r.status == 400
    async with http.get(f"{router}/v1/nothing-here") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "route_not_found"
    async with http.get(f"{router}/v1/completions") as r:
        assert r.status == 405 and "POST" in r.headers["Allow"]
        assert (await r.json())["error"]["code"] == "method_not_allowed"


async def test_unknown_model_is_404_and_aliases_are_accepted(router, http, cluster, tokenizer, config):
    status, body = await post(http, f"{router}/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    cluster.planner = lambda request: plan_text(tokenizer)
    # `vllm bench serve` users pass the model path as the model name.
    status, body = await post(http, f"{router}/v1/completions", {"model": config.model, "prompt": "x"})
    assert status == 200 and body["model"] == MODEL


async def test_a_model_card_is_retrieved_by_id(router, http):
    async with http.get(f"{router}/v1/models/{MODEL}") as response:
        card = await response.json()
        assert response.status == 200, card
    assert card["id"] == MODEL and card["object"] == "model"
    async with http.get(f"{router}/v1/models/org/other-model") as response:
        body = await response.json()
        assert response.status == 404 and body["error"]["code"] == "model_not_found"


async def test_models_lists_the_served_model(router, http):
    async with http.get(f"{router}/v1/models") as response:
        body = await response.json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["max_model_len"] == 4096


async def test_api_key_is_required_on_v1_only(config, tokenizer, http, cluster):
    config.api_key = "sekrit"
    async with serve_router(config, tokenizer=tokenizer) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            async with http.get(f"{url}/v1/models", headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_api_key"
        async with http.get(f"{url}/v1/models", headers={"Authorization": "Bearer sekrit"}) as response:
            assert response.status == 200
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert [m.id async for m in client.models.list()] == [MODEL]
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 200
        async with http.get(f"{url}/health") as response:
            assert response.status == 503  # open, and honest: no instance yet


async def test_context_length_comes_from_the_instances_table(
    sticky_cluster_cache, router, http, cluster, redis_client, nats_client
):
    cluster.planner = lambda request: Plan(token_ids=[5])
    status, _ = await post(http, f"{router}/v1/completions", {"prompt": "x", "max_tokens": 40})
    assert status == 200  # within config.json's 4096
    await register_instance(redis_client, cluster.prefix, "inst-a", max_model_len=32)
    await nats_client.publish(subjects.cluster_changed(cluster.prefix), encode(changed()))
    status, body = await eventually(
        lambda: post(http, f"{router}/v1/completions", {"prompt": "x", "max_tokens": 40}),
        lambda result: result[0] != 200,
    )
    assert status == 400 and body["error"]["param"] == "max_tokens" and "32" in body["error"]["message"]


async def test_requests_do_not_wait_for_redis_once_the_table_is_known(
    monkeypatch, config, tokenizer, http, cluster, redis_client
):
    # An expired table still answers the request at once (a background read refreshes it), so no request
    # pays a Redis round trip in its TTFT; only a ClusterChanged broadcast forces a read on the request path.
    monkeypatch.setattr(app_module, "CLUSTER_CACHE_SECONDS", 0.2)
    cluster.planner = lambda request: Plan(token_ids=[5])
    await register_instance(redis_client, cluster.prefix, "inst-a", max_model_len=32)
    body = {"prompt": "x", "max_tokens": 40}
    async with serve_router(config, tokenizer=tokenizer) as url:
        status, _ = await post(http, f"{url}/v1/completions", body)
        assert status == 400  # the first request reads the table
        await register_instance(redis_client, cluster.prefix, "inst-a", max_model_len=4096)  # no broadcast
        await asyncio.sleep(0.3)
        status, _ = await post(http, f"{url}/v1/completions", body)
        assert status == 400  # answered from the expired table, which is now being refreshed
        status, _ = await eventually(
            lambda: post(http, f"{url}/v1/completions", body), lambda result: result[0] == 200
        )
        assert status == 200


# ---- the official client -----------------------------------------------------------------------------------


async def test_openai_client_streaming_and_not(router, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, finish_reason="stop")
    client = AsyncOpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)
    completion = await client.completions.create(model=MODEL, prompt="hi", max_tokens=30)
    assert completion.choices[0].text == TEXT and completion.usage.completion_tokens == len(
        token_ids(tokenizer, TEXT)
    )

    stream = await client.completions.create(
        model=MODEL,
        prompt="hi",
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(token_ids(tokenizer, TEXT))

    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == TEXT and chat.choices[0].finish_reason == "stop"

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.total_tokens > 0


# ---- health, metrics ---------------------------------------------------------------------------------------


def changed() -> ClusterChanged:
    return ClusterChanged(reason="test", time=time.time())


async def register_instance(
    redis_client: aioredis.Redis,
    prefix: str,
    instance_id: str,
    *,
    lease: bytes | None = b"coordinator-1",
    max_model_len: int = 4096,
) -> None:
    info = InstanceInfo(
        instance_id=instance_id,
        model=MODEL,
        subjects=subjects.instance_subjects(prefix, instance_id),
        kv_blocks_total=100,
        block_size=16,
        max_model_len=max_model_len,
        policy="sarathi",
        pid=1,
        host="localhost",
        started_at=time.time(),
    )
    await redis_client.hset(keys.instances(prefix), instance_id, encode(info))
    if lease is not None:
        await redis_client.set(keys.instance_lease(prefix, instance_id), lease, px=60_000)


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(f"{url}/health") as response:
        return response.status, await response.json()


async def test_health_follows_the_instances_table(
    sticky_cluster_cache, router, http, redis_client, nats_client, ecoserve_prefix
):
    status, body = await health(http, router)
    assert status == 503 and "no instance" in body["error"]["message"]

    async def after_change(expected: int, message: str = "") -> tuple[int, dict]:
        # The router keeps its view until the coordinator's ClusterChanged broadcast drops it.
        await nats_client.publish(subjects.cluster_changed(ecoserve_prefix), encode(changed()))
        return await eventually(
            lambda: health(http, router),
            lambda result: result[0] == expected and message in json.dumps(result[1]),
        )

    lease = keys.instance_lease(ecoserve_prefix, "inst-a")
    await register_instance(redis_client, ecoserve_prefix, "inst-a", lease=None)  # registered, lease expired
    status, body = await after_change(503, "1 registered, 0 alive")
    assert status == 503 and "1 registered, 0 alive" in body["error"]["message"]
    await redis_client.set(lease, b"coordinator-1", px=60_000)  # what the coordinator writes: alive
    status, body = await after_change(200)
    assert status == 200 and body["ready_instances"] == 1
    assert (await health(http, router))[0] == 200
    # An operator drains it: the coordinator marks it in its macro instance's state hash.
    await redis_client.sadd(keys.macro_instances(ecoserve_prefix), "m0")
    await redis_client.hset(keys.macro_state(ecoserve_prefix, "m0"), "state:inst-a", "draining")
    assert (await after_change(503))[0] == 503
    await redis_client.hset(keys.macro_state(ecoserve_prefix, "m0"), "state:inst-a", "ready")
    assert (await after_change(200))[0] == 200
    await redis_client.set(lease, b"starting", px=60_000)  # a lease holding a state name
    status, body = await after_change(503, "1 alive")
    assert status == 503 and "1 registered, 1 alive, none ready" in body["error"]["message"]
    await redis_client.delete(lease)  # the lease expires
    status, body = await after_change(503, "0 alive")
    assert status == 503 and "1 registered, 0 alive" in body["error"]["message"]


async def test_metrics_use_vllm_names(router, http, cluster, tokenizer):
    cluster.planner = lambda request: plan_text(tokenizer, delay=0.005)
    await post(http, f"{router}/v1/completions", {"prompt": "x"})
    await post(http, f"{router}/v1/completions", {"prompt": "x", "max_tokens": 0})  # a 400
    async with http.get(f"{router}/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    n_out = len(token_ids(tokenizer, TEXT))
    label = f'model_name="{MODEL}"'
    for name in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:request_time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
    ):
        assert f"{name}{{{label}}}" in text, name
    assert f"vllm:generation_tokens_total{{{label}}} {float(n_out)}" in text
    assert f'vllm:request_success_total{{finished_reason="length",{label}}} 1.0' in text
    assert f"vllm:inter_token_latency_seconds_count{{{label}}} {float(n_out - 1)}" in text
    assert 'ecoserve_router_http_errors_total{status="400"} 1.0' in text
    assert "ecoserve_router_submit_latency_seconds_count 1.0" in text
    assert f"ecoserve_router_requests_in_flight{{{label}}} 0.0" in text


# ---- load and topology -------------------------------------------------------------------------------------


async def test_32_concurrent_streams_complete(router, http, cluster, tokenizer):
    def planner(request: SubmitRequest) -> Plan:
        return plan_text(tokenizer, f"answer number {request.prompt_token_ids[-1]}", delay=0.002)

    cluster.planner = planner

    async def one(i: int) -> str:
        body = {"prompt": [5, 100 + i], "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(f"{router}/v1/completions", json=body) as response:
            events = await read_sse(response)
        assert events[-2].data["choices"] == []
        return joined_text(events)

    texts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), 30)
    assert texts == [f"answer number {100 + i}" for i in range(32)]


async def test_two_routers_side_by_side_get_their_own_tokens(config, tokenizer, http, cluster):
    def planner(request: SubmitRequest) -> Plan:
        return plan_text(tokenizer, f"tokens for {request.router_id}", delay=0.002)

    cluster.planner = planner
    second = RouterConfig(**{**config.__dict__, "router_id": "router-b"})
    async with (
        serve_router(config, tokenizer=tokenizer) as url_a,
        serve_router(second, tokenizer=tokenizer) as url_b,
    ):

        async def ask(url: str) -> str:
            async with http.post(f"{url}/v1/completions", json={"prompt": "x", "stream": True}) as response:
                return joined_text(await read_sse(response))

        results = await asyncio.gather(*(ask(url) for url in (url_a, url_b) * 4))
    assert results == ["tokens for router-a", "tokens for router-b"] * 4
    assert {r.reply_subject.rsplit(".", 2)[1] for r in cluster.submits} == {"router-a", "router-b"}


async def test_cluster_gauges_come_from_status_in_the_lease(
    sticky_cluster_cache, router, http, redis_client, nats_client, ecoserve_prefix
):
    def status(instance_id: str, running: int, waiting: int, free: int) -> bytes:
        return encode(
            InstanceStatus(
                instance_id=instance_id,
                seq=1,
                time=time.time(),
                state="ready",
                phase="decode",
                num_running=running,
                num_waiting=waiting,
                kv_blocks_free=free,
                kv_blocks_total=100,
                num_preemptions=0,
                requests=[],
            )
        )

    await register_instance(redis_client, ecoserve_prefix, "inst-a", lease=status("inst-a", 3, 1, 70))
    await register_instance(redis_client, ecoserve_prefix, "inst-b", lease=status("inst-b", 2, 4, 50))
    await nats_client.publish(subjects.cluster_changed(ecoserve_prefix), encode(changed()))

    async def scrape() -> str:
        async with http.get(f"{router}/metrics") as response:
            return await response.text()

    text = await eventually(scrape, lambda text: "ecoserve_router_ready_instances 2.0" in text)
    label = f'model_name="{MODEL}"'
    assert f"vllm:num_requests_running{{{label}}} 5.0" in text
    assert f"vllm:num_requests_waiting{{{label}}} 5.0" in text
    assert f"vllm:kv_cache_usage_perc{{{label}}} 0.4" in text  # (30 + 50) used of 200 blocks
    assert "ecoserve_router_ready_instances 2.0" in text


async def test_browsers_may_call_the_api_cross_origin_as_on_vllm(config, tokenizer, http, cluster):
    config.api_key = "sekrit"
    cluster.planner = lambda request: plan_text(tokenizer)
    async with serve_router(config, tokenizer=tokenizer) as url:
        preflight = {
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        # The preflight carries no key, and must not need one.
        async with http.options(f"{url}/v1/chat/completions", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        headers = {"Origin": "https://chat.example", "Authorization": "Bearer sekrit"}
        body = {"prompt": "x", "stream": True}
        async with http.post(f"{url}/v1/completions", json=body, headers=headers) as response:
            assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == "*"
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        async with http.post(f"{url}/v1/completions", json=body, headers={"Origin": "https://x"}) as response:
            assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_follows_the_allowed_origins(config, tokenizer, http, cluster):
    config.allowed_origins = "https://chat.example, https://other.example"
    cluster.planner = lambda request: plan_text(tokenizer)

    def preflight(origin: str) -> dict[str, str]:
        return {"Access-Control-Request-Method": "POST", "Origin": origin}

    async with serve_router(config, tokenizer=tokenizer) as url:
        async with http.options(f"{url}/v1/completions", headers=preflight("https://evil.example")) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        origin = {"Origin": "https://other.example"}
        async with http.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=origin) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "https://other.example"
            assert "Origin" in r.headers.getall("Vary")
    config.allowed_origins = ""
    async with (
        serve_router(config, tokenizer=tokenizer) as url,
        http.options(f"{url}/v1/completions", headers=preflight("https://chat.example")) as r,
    ):
        assert r.status == 403
