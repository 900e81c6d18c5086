"""PaDG end to end: real coordinator, three padg-policy instances and a router, over real NATS and Redis, on a
tiny model. The TTFT SLO is set from the instances' own prefill profiles so a prefill window holds only a few
prompts: bursts of requests make the activation roll through every instance. Every request's greedy output
must equal the engine's alone, and a coordinator restart mid-run must resume the activation from Redis."""

from __future__ import annotations

import asyncio
import functools
import math
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from cluster_support import ClusterProcesses, EngineAlone, running_cluster

from services.coordinator.prefill_model import PrefillModel
from shared import keys
from shared.messages import InstanceInfo
from shared.prefill_profile import PrefillProfile
from shared.wire import decode

pytestmark = pytest.mark.timeout(420)
ARCH = "qwen2"
INSTANCES = ("pa", "pb", "pc")
PROMPT_TOKENS = 24
MAX_TOKENS = 6
PADG_FLAGS = (
    *("--dispatch-policy", "padg", "--ttft-slo", "5", "--tpot-slo", "10", "--pending-timeout", "8"),
    *("--coordinator-lease-seconds", "2"),
)


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
        procs.start_coordinator("coordinator", *PADG_FLAGS)
        for instance_id in INSTANCES:
            procs.start_instance(instance_id, "--policy", "padg")
        procs.start_router()
        return len(INSTANCES)

    logs = tmp_path_factory.mktemp("logs")
    async with running_cluster(
        nats_server.url, redis_server.url, model_dir, logs, "padg", start, ready_timeout=240
    ) as procs:
        yield procs


def prompt(i: int) -> list[int]:
    return [(i * 37 + k * 11) % 200 + 5 for k in range(PROMPT_TOKENS)]


async def burst(cluster: ClusterProcesses, name: str, first: int, size: int, engine_tokens) -> None:
    """`size` concurrent requests; each one's text must be the engine's alone."""
    ids = [prompt(i) for i in range(first, first + size)]
    try:
        texts = await asyncio.wait_for(asyncio.gather(*(text_of(cluster.url, name, p) for p in ids)), 120)
    except TimeoutError:
        status = await cluster.admin(cluster.nc, "status")
        raise AssertionError(f"burst at {first} did not finish: {status}\n{cluster.logs()}") from None
    for p, text in zip(ids, texts, strict=True):
        assert text == cluster.decode(engine_tokens(p)), p


async def text_of(url: str, name: str, ids: list[int]) -> str:
    body = {"model": name, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        result = await r.json()
        assert r.status == 200, result
    assert result["usage"]["completion_tokens"] == MAX_TOKENS
    return result["choices"][0]["text"]


async def padg_state(cluster: ClusterProcesses) -> dict:
    (macro,) = (await cluster.admin(cluster.nc, "status"))["macro_instances"]
    assert macro["policy"] == "padg", macro
    return macro


async def windows_settled(cluster: ClusterProcesses, timeout: float = 15.0) -> dict:
    """Until only the active instance reports its window open, at the current epoch."""
    deadline = time.monotonic() + timeout
    while True:
        macro = await padg_state(cluster)
        instances = (await cluster.admin(cluster.nc, "instances"))["instances"]
        open_ = {i["instance_id"]: i["window_epoch"] for i in instances if i["prefill_window"]}
        if open_ == {macro["active"]: macro["window_epoch"]}:
            return macro
        if time.monotonic() > deadline:
            raise AssertionError(f"windows never settled: {macro}, {instances}")
        await asyncio.sleep(0.2)


async def test_rolling_windows_greedy_equality_and_coordinator_restart(
    cluster, model_dir, engine_tokens, redis_server
):
    from services.instance.models.loader import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    cluster.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    name = model_dir.name

    # A prefill window's budget: about two of these prompts on the slowest instance, so bursts roll.
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        infos = [
            decode(raw, InstanceInfo)
            for raw in (await redis.hgetall(keys.instances(cluster.prefix))).values()
        ]
    finally:
        await redis.aclose()
    prices = []
    for info in infos:
        assert info.policy == "padg" and info.prefill_profile is not None, info
        prices.append(
            PrefillModel(PrefillProfile.from_dict(info.prefill_profile).points).predict(PROMPT_TOKENS)
        )
    ttft = 2.5 * max(prices)
    per_window = math.floor(ttft / min(prices))  # the most one window can admit
    size = min(40, 3 * per_window + 1)
    await cluster.admin(cluster.nc, "config-set", ttft_slo=ttft)

    await burst(cluster, name, 0, size, engine_tokens)
    await burst(cluster, name, 100, size, engine_tokens)
    macro = await windows_settled(cluster)
    assert set(macro["windows_opened"]) == set(INSTANCES), macro  # every instance took its turn
    assert all(n >= 1 for n in macro["windows_opened"].values())
    assert macro["window_epoch"] >= len(INSTANCES) and macro["pending"] == 0
    # The instances' side: each one applied window orders (its reported epoch is that of its last order).
    instances = (await cluster.admin(cluster.nc, "instances"))["instances"]
    assert all(i["policy"] == "padg" and i["window_epoch"] >= 1 for i in instances), instances
    assert len({i["window_epoch"] for i in instances}) > 1  # orders of different activations
    before = macro

    # The coordinator crashes (no clean step-down); a new process takes the lease once it lapses, resumes the
    # activation from Redis and keeps the epochs growing.
    crashed = cluster.processes.pop("coordinator")
    crashed.kill()
    crashed.wait()
    cluster.start_coordinator("coordinator-2", *PADG_FLAGS)
    await cluster.wait_ready_instances(cluster.nc, len(INSTANCES), timeout=60)
    resumed = await padg_state(cluster)
    assert (resumed["active"], resumed["window_epoch"]) == (before["active"], before["window_epoch"])
    assert resumed["windows_opened"] == before["windows_opened"]
    await windows_settled(cluster)

    await burst(cluster, name, 200, size, engine_tokens)
    after = await windows_settled(cluster)
    assert after["window_epoch"] > before["window_epoch"], (before, after)
    assert sum(after["windows_opened"].values()) > sum(before["windows_opened"].values())
