"""Mitosis scaling in the running coordinator (CoordinatorService on real NATS and Redis, scripted instances):
placement at registration, splits, the overall scheduler spreading submits, removal into the spare pool, and
the pool surviving a coordinator restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from coordinator_support import (
    FakeInstance,
    admin,
    coordinator_config,
    eventually,
    make_submit,
    running,
    submit,
)
from nats.aio.client import Client as NATS

from services.coordinator.scaling import SPARE_POOL
from services.infra.embedded import EmbeddedServer
from shared import keys
from shared.messages import SubmitAck


@contextlib.asynccontextmanager
async def heartbeats(instances: list[FakeInstance]) -> AsyncIterator[None]:
    """Idle status reports from `instances` (a list the test extends as it starts them) every 0.2 s, as
    real instances send them."""

    async def beat() -> None:
        while True:
            for instance in instances:
                await instance.report()
            await asyncio.sleep(0.2)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def scaling(nc: NATS, prefix: str) -> dict[str, Any]:
    reply = await admin(nc, prefix, "status")
    assert reply.ok, reply.error
    result: dict[str, Any] = reply.result
    return {
        "macros": {m["macro_instance_id"]: m["members"] for m in result["macro_instances"]},
        "spares": result["scaling"]["spares"],
        "draining": result["scaling"]["draining"],
        "events": [(e["action"], e["cause"]) for e in result["scaling_events"]],
    }


async def test_instances_join_split_serve_leave_and_survive_a_restart(
    nats_server: EmbeddedServer,
    redis_server: EmbeddedServer,
    redis_client: aioredis.Redis,
    nats_client: NATS,
    ecoserve_prefix: str,
) -> None:
    prefix = ecoserve_prefix
    config = coordinator_config(nats_server.url, redis_server.url, prefix, n_lower=1, n_upper=2)
    instances = {i: FakeInstance(nats_client, prefix, i) for i in "abcd"}
    started: list[FakeInstance] = []
    async with running(config), heartbeats(started):
        for instance_id in "abc":
            ack = await instances[instance_id].start()
            assert ack is not None and ack.accepted and ack.macro_instance_id == "m0"
            started.append(instances[instance_id])

        # The third exceeded N_u = 2: the next tick splits it off into m1.
        async def split() -> bool:
            return (await scaling(nats_client, prefix))["macros"] == {"m0": ["a", "b"], "m1": ["c"]}

        await eventually(split)
        await asyncio.sleep(0.5)  # a report from c after the move

        # The overall scheduler weighs macro instances by ready members: 2 : 1.
        placed = []
        for n in range(6):
            reply = await submit(nats_client, prefix, make_submit(f"r{n}", f"{prefix}.router.t.tokens"))
            assert isinstance(reply, SubmitAck), reply
            placed.append(reply.instance_id)
        assert sum(i in ("a", "b") for i in placed) == 4 and placed.count("c") == 2

        # c leaves m1 (its last member: m1 retires), drains, and is a spare once its report is empty.
        assert (await admin(nats_client, prefix, "remove-instance", instance_id="c")).ok

        async def spare() -> bool:
            view = await scaling(nats_client, prefix)
            return view["spares"] == ["c"] and view["macros"] == {"m0": ["a", "b"]}

        await eventually(spare)
        assert b"m1" not in await redis_client.smembers(keys.macro_instances(prefix))

        # Autoscaling on: a new instance waits in the pool.
        assert (await admin(nats_client, prefix, "scaling-set", enabled="on")).ok
        ack = await instances["d"].start()
        assert ack is not None and ack.macro_instance_id == SPARE_POOL
        started.append(instances["d"])

    # A new coordinator reloads the pool with the rest of the membership, and the settings.
    async with running(config), heartbeats(started):

        async def reloaded() -> bool:
            view = await scaling(nats_client, prefix)
            return view["spares"] == ["c", "d"] and view["macros"] == {"m0": ["a", "b"]}

        await eventually(reloaded)
        view = await admin(nats_client, prefix, "scaling-get")
        assert view.result["scaling"]["enabled"] is True
        events = (await scaling(nats_client, prefix))["events"]
        assert (
            ("split", "join") in events and ("remove", "manual") in events and ("spare", "drained") in events
        )
    for instance in instances.values():
        await instance.stop()
