"""FuDG end to end: a real coordinator (`dispatch_policy fudg`), a prefill-role and a decode-role instance and
a router, over real NATS and Redis, on a tiny model. Greedy outputs equal the engine's alone; each stream is
numbered without a gap across the hand-off; every hand-off is reported; and killing the decode instance
mid-stream ends the stream with an error promptly (the router knows only the prefill instance: the
coordinator's in-flight entry under the decode instance is what ends it)."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time

import aiohttp
import nats
import pytest
import redis.asyncio as aioredis
from cluster_support import ClusterProcesses, EngineAlone, final_error, read_events, running_cluster

from shared import keys, subjects
from shared.kv_messages import KvTransferReport
from shared.messages import InstanceInfo, TokenBatch, TokenChunk
from shared.wire import decode

pytestmark = pytest.mark.timeout(300)
ARCH = "qwen2"
PROMPT_TOKENS = 20
MAX_TOKENS = 8
ROUTER_ID = "fudg-router"
PREFILL, DECODE = "fp", "fd"


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models[ARCH]


@pytest.fixture(scope="module")
def engine_tokens(model_dir):
    """Greedy tokens of the engine alone, one request at a time."""
    return functools.partial(EngineAlone(model_dir), max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
async def cluster(nats_server, redis_server, model_dir, tmp_path_factory):
    def start(procs: ClusterProcesses) -> int:
        procs.start_coordinator("coordinator", "--dispatch-policy", "fudg")
        procs.start_instance(PREFILL, "--policy", "nodg", "--fudg-role", "prefill")
        procs.start_instance(DECODE, "--policy", "nodg", "--fudg-role", "decode")
        procs.start_router("router", None, "--router-id", ROUTER_ID)
        return 2

    logs = tmp_path_factory.mktemp("logs")
    async with running_cluster(
        nats_server.url, redis_server.url, model_dir, logs, "fudg", start, ready_timeout=180
    ) as procs:
        yield procs


def prompt(i: int) -> list[int]:
    return [(i * 41 + k * 13) % 200 + 5 for k in range(PROMPT_TOKENS)]


async def stream_text(url: str, name: str, ids: list[int]) -> str:
    body = {
        "model": name,
        "prompt": ids,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text = ""
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
    return text


async def drain(subscription, kind: type, until: int, timeout: float = 10.0) -> list:
    """Messages of `kind` from the subscription until `until` of them arrived (or the timeout)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < until and time.monotonic() < deadline:
        try:
            msg = await subscription.next_msg(timeout=max(0.05, deadline - time.monotonic()))
        except (TimeoutError, nats.errors.TimeoutError):
            break
        got.append(decode(msg.data, kind))
    return got


async def test_disaggregated_requests_equal_the_engine(cluster, model_dir, engine_tokens, redis_server):
    from services.instance.models.loader import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        stored = await redis.hgetall(keys.instances(cluster.prefix))
    finally:
        await redis.aclose()
    roles = {info.instance_id: info.role for info in (decode(raw, InstanceInfo) for raw in stored.values())}
    assert roles == {PREFILL: "prefill", DECODE: "decode"}

    chunks_sub = await cluster.nc.subscribe(subjects.router_tokens(cluster.prefix, ROUTER_ID))
    reports_sub = await cluster.nc.subscribe(subjects.kv_transfers(cluster.prefix))
    await cluster.nc.flush()
    prompts = [prompt(i) for i in range(6)]
    texts = await asyncio.wait_for(
        asyncio.gather(*(stream_text(cluster.url, model_dir.name, p) for p in prompts)), 120
    )
    for p, text in zip(prompts, texts, strict=True):
        assert text == tokenizer.decode(engine_tokens(p), skip_special_tokens=True), p

    # One stream per request, numbered 0, 1, 2, … across the hand-off (first token from the prefill instance).
    reports = await drain(reports_sub, KvTransferReport, len(prompts))
    messages = await drain(chunks_sub, (TokenChunk, TokenBatch), 10**6, timeout=1.0)
    chunks = [c for m in messages for c in (m.chunks if isinstance(m, TokenBatch) else [m])]
    by_request: dict[str, list[TokenChunk]] = {}
    for chunk in chunks:
        by_request.setdefault(chunk.request_id, []).append(chunk)
    assert len(by_request) == len(prompts)
    for request_id, own in by_request.items():
        assert [c.seq for c in own] == list(range(len(own))), request_id
        assert sum(len(c.token_ids) for c in own) == MAX_TOKENS and own[-1].finished
        assert own[-1].finish_reason == "length" and not any(c.error for c in own)
        assert len({c.first_token_time for c in own}) == 1  # the prefill instance's, carried over

    # Every request was handed from the prefill to the decode instance, and the hand-off was measured.
    assert {r.request_id for r in reports} == set(by_request)
    for report in reports:
        assert report.accepted, report
        assert (report.prefill_instance_id, report.decode_instance_id) == (PREFILL, DECODE)
        assert report.num_tokens >= PROMPT_TOKENS and 0 < report.kv_bytes < report.wire_bytes
        assert report.transfer_seconds > 0 and report.num_chunks >= 1
    await chunks_sub.unsubscribe()
    await reports_sub.unsubscribe()

    summaries = await idle(cluster)
    assert {s["instance_id"]: s["role"] for s in summaries} == roles
    for summary in summaries:  # no KV block left behind on either side
        assert summary["kv_blocks_free"] == summary["kv_blocks_total"], summary


async def idle(cluster: ClusterProcesses, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        summaries = (await cluster.admin(cluster.nc, "instances"))["instances"]
        if all(s["num_running"] == s["num_waiting"] == s["inflight"] == 0 for s in summaries):
            return summaries
        assert time.monotonic() < deadline, summaries
        await asyncio.sleep(0.1)


async def test_a_request_done_at_its_first_token_frees_its_decode_reservation(cluster, model_dir):
    """It never leaves the prefill instance: the coordinator must not keep counting KV on the decode one
    (before: until a 40 s grace ran out, skewing FuDG's placement and `admin instances`)."""
    body = {"model": model_dir.name, "prompt": prompt(7), "max_tokens": 1, "ignore_eos": True}
    async with aiohttp.ClientSession() as s, s.post(cluster.url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["usage"]["completion_tokens"] == 1
    summaries = await idle(cluster, timeout=5.0)
    assert all(summary["inflight"] == 0 for summary in summaries)


async def test_losing_the_decode_instance_ends_the_stream(cluster, model_dir):
    """Runs last in this module: it kills the decode instance."""
    name = model_dir.name
    body = {"model": name, "prompt": prompt(99), "max_tokens": 3000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(cluster.url + "/v1/completions", json=body)
        assert resp.status == 200
        await read_events(resp, 4)  # past the hand-off: the decode instance is generating
        cluster.signal(DECODE, signal.SIGKILL)
        killed_at = time.monotonic()
        error = await final_error(resp)
        elapsed = time.monotonic() - killed_at
    assert error is not None, "the stream must end with an error event"
    assert f"instance {DECODE} lost" in json.dumps(error), error  # the coordinator's seq=-1 chunk
    assert elapsed < 10, f"took {elapsed:.1f}s to end the stream"
    cluster.processes.pop(DECODE).wait()

    # Without a decode instance FuDG serves nothing, and says so; the prefill instance holds nothing.
    async with aiohttp.ClientSession() as s:
        plain = {"model": name, "prompt": prompt(5), "max_tokens": 4}
        async with s.post(cluster.url + "/v1/completions", json=plain) as r:
            assert r.status == 503, await r.text()
            assert "decode" in await r.text()
    (survivor,) = await idle(cluster)
    assert survivor["instance_id"] == PREFILL
    assert survivor["kv_blocks_free"] == survivor["kv_blocks_total"]


async def test_losing_the_prefill_instance_stops_the_decoding(cluster, model_dir):
    """After the previous test: a new decode instance joins; then the prefill instance dies mid-stream. The
    stream ends with an error, and the coordinator aborts the request on the decode instance, which would
    otherwise decode all of it for nobody."""
    cluster.start_instance("fd2", "--policy", "nodg", "--fudg-role", "decode")
    await cluster.wait_ready_instances(cluster.nc, 2, timeout=120)
    body = {
        "model": model_dir.name,
        "prompt": prompt(98),
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as s:
        resp = await s.post(cluster.url + "/v1/completions", json=body)
        assert resp.status == 200, await resp.text()
        await read_events(resp, 4)
        cluster.signal(PREFILL, signal.SIGKILL)
        killed_at = time.monotonic()
        error = await final_error(resp)
        assert error is not None and time.monotonic() - killed_at < 10
    cluster.processes.pop(PREFILL).wait()
    (survivor,) = await idle(cluster)
    assert survivor["instance_id"] == "fd2" and survivor["kv_blocks_free"] == survivor["kv_blocks_total"]
