"""Mitosis's manual operations under load, end to end: real coordinator (PaDG), three padg instances and a
router over real NATS and Redis on a tiny model. While clients keep sending requests, `remove-instance` drains
one instance into the spare pool and `add-instance` brings it back; no request may fail, every greedy output
must equal the engine's alone, the removed instance must get no new work while it is a spare, and it must
serve again once added back."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from cluster_support import ClusterProcesses, running_cluster
from test_padg_cluster import engine_tokens, model_dir, prompt, text_of  # noqa: F401 (fixtures)

from services.instance.models.loader import load_tokenizer
from services.text.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.timeout(420)
INSTANCES = ("sa", "sb", "sc")
MOVED = "sc"
FLAGS = (
    *("--dispatch-policy", "padg", "--ttft-slo", "5", "--tpot-slo", "10", "--pending-timeout", "8"),
    *("--n-lower", "1", "--n-upper", "3"),
)


@pytest.fixture(scope="module")
async def cluster(nats_server, redis_server, model_dir, tmp_path_factory):  # noqa: F811
    def start(procs: ClusterProcesses) -> int:
        procs.start_coordinator("coordinator", *FLAGS)
        for instance_id in INSTANCES:
            procs.start_instance(instance_id, "--policy", "padg")
        procs.start_router()
        return len(INSTANCES)

    logs = tmp_path_factory.mktemp("logs")
    async with running_cluster(
        nats_server.url, redis_server.url, model_dir, logs, "scal", start, ready_timeout=240
    ) as procs:
        yield procs


async def scaling_view(cluster: ClusterProcesses) -> dict:
    return (await cluster.admin(cluster.nc, "status"))["scaling"]


async def until(cluster: ClusterProcesses, what: str, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = await cluster.admin(cluster.nc, "status")
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"{what} never happened: {status}\n{cluster.logs()}"
        await asyncio.sleep(0.2)


def members(status: dict) -> set[str]:
    return {m for macro in status["scaling"]["macro_instances"] for m in macro["members"]}


async def test_remove_and_add_an_instance_under_load_fails_no_request(
    cluster,
    model_dir,  # noqa: F811
    engine_tokens,  # noqa: F811
):
    tokenizer = load_tokenizer(model_dir)
    name = model_dir.name
    results: list[tuple[list[int], str]] = []
    stop = asyncio.Event()
    counter = iter(range(10**6))

    async def client() -> None:
        while not stop.is_set():
            ids = prompt(next(counter))
            results.append((ids, await text_of(cluster.url, name, ids)))  # asserts HTTP 200

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await until(cluster, "some load", lambda _: len(results) >= 8)
        assert members(await cluster.admin(cluster.nc, "status")) == set(INSTANCES)

        await cluster.admin(cluster.nc, "remove-instance", instance_id=MOVED)
        status = await until(cluster, f"{MOVED} becoming a spare", lambda s: MOVED in s["scaling"]["spares"])
        assert members(status) == set(INSTANCES) - {MOVED}
        served_while_spare = len(results)
        spare = next(i for i in status["instances"] if i["instance_id"] == MOVED)
        assert spare["macro_instance_id"] == "spare" and spare["inflight"] == 0, spare
        await until(cluster, "load on the others", lambda _: len(results) >= served_while_spare + 8)
        spare = next(
            i
            for i in (await cluster.admin(cluster.nc, "instances"))["instances"]
            if i["instance_id"] == MOVED
        )
        assert spare["inflight"] == 0 and spare["num_running"] == 0, "a spare got work"

        await cluster.admin(cluster.nc, "add-instance", instance_id=MOVED)
        await until(cluster, f"{MOVED} serving again", lambda s: MOVED in members(s))
        # It takes prefill windows (and so requests) again: its window count grows.
        opened = (await cluster.admin(cluster.nc, "status"))["macro_instances"]
        before = sum(m["windows_opened"].get(MOVED, 0) for m in opened)
        await until(
            cluster,
            f"{MOVED} opening a prefill window",
            lambda s: sum(m["windows_opened"].get(MOVED, 0) for m in s["macro_instances"]) > before,
        )
        events = (await cluster.admin(cluster.nc, "status"))["scaling_events"]
        manual = [(e["action"], tuple(e["instances"])) for e in events if e["cause"] == "manual"]
        assert manual[-2:] == [("remove", (MOVED,)), ("add", (MOVED,))], events
    finally:
        stop.set()
        outcomes = await asyncio.gather(*clients, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, failures
    assert len(results) >= 24
    for ids, text in results:
        # The router's text follows the prompt's text (a character split across the prompt/output boundary
        # is shown whole), so the expected text is the engine's tokens detokenized the same way.
        expected = IncrementalDetokenizer(tokenizer, ids)
        assert text == expected.push(engine_tokens(ids)).text + expected.flush(), ids
    async with aiohttp.ClientSession() as s, s.get(cluster.url + "/health") as r:
        assert r.status == 200
