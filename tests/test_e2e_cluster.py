"""End to end: real router, coordinator and instance processes over real NATS and Redis, a real (tiny)
transformers model, driven by HTTP clients including the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import openai
import pytest
from cluster_support import ClusterProcesses, EngineAlone, final_error, running_cluster

from services.instance.models.loader import load_tokenizer
from shared import subjects
from shared.messages import ErrorReply
from shared.wire import decode

pytestmark = pytest.mark.timeout(300)
ARCH = "qwen2"
PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\nclass Matrix:\n    def __init__(self, rows):\n",
    "for line in open('data.txt'):",
]


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models[ARCH]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def engine_tokens(model_dir):
    """Greedy tokens from the engine alone, for any prompt ids."""
    return EngineAlone(model_dir)


@pytest.fixture(scope="module")
async def cluster(nats_server, redis_server, model_dir, tmp_path_factory):
    def start(procs: ClusterProcesses) -> int:
        procs.start_coordinator()
        procs.start_instance("inst-a")
        procs.start_instance("inst-b")
        procs.start_router()
        return 2

    logs = tmp_path_factory.mktemp("logs")
    async with running_cluster(nats_server.url, redis_server.url, model_dir, logs, "e2e", start) as procs:
        yield procs


def model_name(model_dir) -> str:
    return model_dir.name


async def post(url: str, path: str, body: dict, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body, **kwargs) as r:
        return r.status, await r.json()


async def stream_events(url: str, path: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_completions_equal_the_engine(cluster, model_dir, tokenizer, engine_tokens):
    name = model_name(model_dir)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected = engine_tokens(ids, 16)
        status, body = await post(
            cluster.url, "/v1/completions", {"model": name, "prompt": ids, "max_tokens": 16, "temperature": 0}
        )
        assert status == 200, body
        assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(expected),
            "total_tokens": len(ids) + len(expected),
        }
        events = await stream_events(
            cluster.url,
            "/v1/completions",
            {
                "model": name,
                "prompt": prompt,
                "max_tokens": 16,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert events[-1] == "[DONE]"
        usage_chunk = events[-2]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(expected)
        text = "".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"])
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert all(e["choices"] for e in events[:-2]), "no chunk with choices before the usage chunk is empty"


async def test_chat_streaming_and_not_with_the_openai_client(cluster, model_dir, tokenizer, engine_tokens):
    name = model_name(model_dir)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    expected_text = tokenizer.decode(engine_tokens(ids, 12), skip_special_tokens=True)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused")
    resp = await client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == expected_text
    assert resp.usage.prompt_tokens == len(ids)
    stream = await client.chat.completions.create(
        model=name,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == expected_text
    assert usage is not None and usage.completion_tokens == resp.usage.completion_tokens
    models = await client.models.list()
    assert name in [m.id for m in models.data]
    await client.close()


async def test_32_concurrent_streams_complete(cluster, model_dir, tokenizer, engine_tokens):
    name = model_name(model_dir)
    prompts = [f"value_{i} = compute({i}, {i * 7})" for i in range(32)]

    async def one(prompt: str) -> tuple[str, str]:
        events = await stream_events(
            cluster.url,
            "/v1/completions",
            {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True},
        )
        return prompt, "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])

    results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 180)
    for prompt, text in results:
        ids = tokenizer(prompt)["input_ids"]
        assert text == tokenizer.decode(engine_tokens(ids, 10), skip_special_tokens=True), prompt


async def wait_idle(cluster, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        instances = (await cluster.admin(cluster.nc, "instances"))["instances"]
        if all(
            i["num_running"] == 0 and i["num_waiting"] == 0 and i["kv_blocks_free"] == i["kv_blocks_total"]
            for i in instances
        ):
            return instances
        assert time.monotonic() < deadline, f"blocks still held: {instances}"
        await asyncio.sleep(0.2)


async def test_client_disconnect_frees_kv_blocks(cluster, model_dir):
    body = {
        "model": model_name(model_dir),
        "prompt": "while True:",
        "max_tokens": 3000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    async with aiohttp.ClientSession() as s:
        resp = await s.post(cluster.url + "/v1/completions", json=body)
        got = 0
        async for raw in resp.content:
            if raw.startswith(b"data: "):
                got += 1
                if got == 3:
                    break
        busy = (await cluster.admin(cluster.nc, "instances"))["instances"]
        assert any(i["kv_blocks_free"] < i["kv_blocks_total"] for i in busy)
        resp.close()  # the client goes away mid-stream
    await wait_idle(cluster)


async def test_bad_input_gets_openai_errors(cluster, model_dir):
    name = model_name(model_dir)
    status, body = await post(cluster.url, "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = await post(cluster.url, "/v1/completions", {"model": name, "prompt": "x", "top_p": 7})
    assert status == 400 and body["error"]["param"] == "top_p"
    status, body = await post(cluster.url, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "nope" in body["error"]["message"]
    status, body = await post(cluster.url, "/v1/chat/completions", {"model": name, "messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = await post(cluster.url, "/v1/completions", {"model": name, "prompt": [1] * 5000})
    assert status == 400
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            cluster.url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
        ) as r,
    ):
        assert r.status == 400 and "error" in await r.json()
    await wait_idle(cluster)


async def test_malformed_messages_on_every_subject_crash_nothing(
    cluster, model_dir, tokenizer, engine_tokens
):
    nc, p = cluster.nc, cluster.prefix
    garbage = [b"", b"\xc1\xc1", b"\x93\x01\x02", b"not msgpack at all", b"\x81\xa1v\x63"]
    request_reply = [
        subjects.submit(p),
        subjects.register(p),
        subjects.instance_requests(p, "inst-a"),
        subjects.instance_control(p, "inst-b"),
    ]
    for subject in request_reply:
        for payload in garbage:
            msg = await nc.request(subject, payload, timeout=5)
            reply = decode(msg.data, ErrorReply)
            assert reply.code == "bad_message", (subject, payload)
    publish_only = [
        subjects.status(p, "inst-a"),
        subjects.deregister(p),
        subjects.instance_abort(p, "inst-a"),
        subjects.cluster_changed(p),
        subjects.instance_lost(p),
    ]
    for subject in publish_only:
        for payload in garbage:
            await nc.publish(subject, payload)
    await nc.flush()
    await asyncio.sleep(0.5)
    cluster.check_alive()
    await cluster.wait_ready_instances(nc, 2, timeout=10)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    status, body = await post(
        cluster.url,
        "/v1/completions",
        {"model": model_name(model_dir), "prompt": ids, "max_tokens": 8, "temperature": 0},
    )
    assert status == 200
    assert body["choices"][0]["text"] == tokenizer.decode(engine_tokens(ids, 8), skip_special_tokens=True)


async def test_coordinator_restart_loses_no_state(cluster, model_dir):
    before = await cluster.admin(cluster.nc, "status")
    await cluster.admin(cluster.nc, "config-set", max_waiting_per_instance=17)
    assert cluster.stop("coordinator") == 0
    cluster.start_coordinator("coordinator-2")
    deadline = time.monotonic() + 30
    while True:
        try:
            after = await cluster.admin(cluster.nc, "status")
            if after.get("leader"):
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, cluster.logs()
        await asyncio.sleep(0.2)
    assert after["macro_instances"] == before["macro_instances"]
    assert after["config"]["max_waiting_per_instance"] == 17
    await cluster.wait_ready_instances(cluster.nc, 2, timeout=30)
    status, body = await post(
        cluster.url, "/v1/completions", {"model": model_name(model_dir), "prompt": "x = 1", "max_tokens": 4}
    )
    assert status == 200, body


def busy(summary: dict) -> bool:
    return summary["inflight"] > 0 or summary["num_running"] > 0 or summary["num_waiting"] > 0


async def instances_where(cluster, predicate, timeout: float = 10.0) -> list[dict]:
    """Ask the coordinator until `predicate(summaries)` holds: status reports are periodic."""
    deadline = time.monotonic() + timeout
    while True:
        summaries = (await cluster.admin(cluster.nc, "instances"))["instances"]
        if predicate(summaries):
            return summaries
        assert time.monotonic() < deadline, cluster.logs()
        await asyncio.sleep(0.05)


async def test_killed_instance_ends_its_streams_and_survivors_serve(cluster, model_dir):
    """Runs last in this module: it kills an instance."""
    name = model_name(model_dir)
    body = {"model": name, "prompt": "def loop():", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    await instances_where(cluster, lambda summaries: not any(map(busy, summaries)))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(cluster.url + "/v1/completions", json=body)
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        summaries = await instances_where(cluster, lambda summaries: any(map(busy, summaries)))
        holder = next(summary["instance_id"] for summary in summaries if busy(summary))
        cluster.signal(holder, signal.SIGKILL)
        killed_at = time.monotonic()
        error = await final_error(resp)
        elapsed = time.monotonic() - killed_at
    assert error is not None, "the stream must end with an error event"
    assert elapsed < 10, f"took {elapsed:.1f}s to end the stream"
    cluster.processes.pop(holder).wait()
    for _ in range(4):
        status, result = await post(
            cluster.url, "/v1/completions", {"model": name, "prompt": "y = 2", "max_tokens": 4}
        )
        assert status == 200, result
