"""Coordinators come and go: a restart resumes from Redis, and of two coordinators exactly one acts."""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis
from coordinator_support import (
    FakeInstance,
    admin,
    coordinator_config,
    eventually,
    instance_view,
    make_submit,
    running,
    spawn_coordinator,
    submit,
    wait_serving,
)
from nats.aio.client import Client as NATS

from services.coordinator.admin_api import SERVICE_NAME
from services.coordinator.service import CoordinatorService
from services.infra.embedded import EmbeddedServer
from shared import keys
from shared.messages import ErrorReply, SubmitAck


async def test_restart_resumes_membership_order_state_and_config(
    nats_server: EmbeddedServer,
    redis_server: EmbeddedServer,
    nats_client: NATS,
    redis_client: aioredis.Redis,
    ecoserve_prefix: str,
) -> None:
    prefix = ecoserve_prefix
    instances = {name: FakeInstance(nats_client, prefix, name) for name in ("inst-c", "inst-a", "inst-b")}
    async with running(coordinator_config(nats_server.url, redis_server.url, prefix, coordinator_id="first")):
        for instance in instances.values():
            await instance.start()
        assert (await admin(nats_client, prefix, "drain", instance_id="inst-a")).ok
        assert (await admin(nats_client, prefix, "config-set", max_waiting_per_instance=7)).ok
    # Stopped: the lease is released, the state stays.
    assert await redis_client.exists(keys.coordinator_lease(prefix, "m0")) == 0

    config = coordinator_config(nats_server.url, redis_server.url, prefix, coordinator_id="second")
    async with running(config) as second:
        assert second.is_leader
        status = (await admin(nats_client, prefix, "status")).result
        assert status["coordinator_id"] == "second"
        assert status["macro_instances"] == [
            {"macro_instance_id": "m0", "members": ["inst-c", "inst-a", "inst-b"], "policy": "least_loaded"}
        ]
        assert [(i["instance_id"], i["state"]) for i in status["instances"]] == [
            ("inst-c", "ready"),
            ("inst-a", "draining"),
            ("inst-b", "ready"),
        ]
        assert status["config"]["max_waiting_per_instance"] == 7
        # Nothing is dispatched to a reloaded instance before it is heard from again…
        unconfirmed = await submit(nats_client, prefix, make_submit("r0", "router.x.tokens"))
        assert isinstance(unconfirmed, ErrorReply) and unconfirmed.code == "unavailable"
        # …and a report is enough (no new registration needed).
        await instances["inst-b"].report()

        async def dispatchable() -> bool:
            view = await instance_view(nats_client, prefix, "inst-b")
            return view is not None and view["dispatchable"]

        await eventually(dispatchable)
        ack = await submit(nats_client, prefix, make_submit("r1", "router.x.tokens"))
        assert ack == SubmitAck(request_id="r1", instance_id="inst-b")
        # Re-registering keeps the place in the order and the operator's drain (and repeats it).
        await instances["inst-a"].register()

        async def drain_repeated() -> bool:
            return any(c.command == "drain" for c in instances["inst-a"].controls)

        await eventually(drain_repeated)
        status = (await admin(nats_client, prefix, "status")).result
        assert status["macro_instances"][0]["members"] == ["inst-c", "inst-a", "inst-b"]


async def admin_services(nc: NATS, prefix: str) -> list[dict[str, object]]:
    """Every ecoserve-admin nats.micro service of this prefix that answers a PING."""
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
    found = []
    deadline = time.monotonic() + 0.3
    while (left := deadline - time.monotonic()) > 0:
        try:
            ping = json.loads((await replies.next_msg(timeout=left)).data)
        except TimeoutError:
            break
        if ping["metadata"].get("prefix") == prefix:
            found.append(ping)
    await replies.unsubscribe()
    return found


async def test_two_coordinators_one_acts_and_the_standby_takes_over(
    nats_server: EmbeddedServer, redis_server: EmbeddedServer, nats_client: NATS, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    lease = 1.0
    services = [
        CoordinatorService(
            coordinator_config(
                nats_server.url,
                redis_server.url,
                prefix,
                coordinator_id=name,
                coordinator_lease_seconds=lease,
            )
        )
        for name in ("co-1", "co-2")
    ]
    await asyncio.gather(*(s.start() for s in services))
    try:
        leaders = [s for s in services if s.is_leader]
        assert len(leaders) == 1
        (leader,) = leaders
        (standby,) = [s for s in services if not s.is_leader]
        pings = await admin_services(nats_client, prefix)
        assert [p["metadata"]["coordinator_id"] for p in pings] == [leader.coordinator_id]

        instance = FakeInstance(nats_client, prefix, "inst-a")
        await instance.start()
        for i in range(4):
            assert isinstance(
                await submit(nats_client, prefix, make_submit(f"r{i}", "router.x.tokens")), SubmitAck
            )
        assert [d.request_id for d in instance.dispatched] == ["r0", "r1", "r2", "r3"]
        await asyncio.sleep(lease)  # a few renewals later, still one leader
        assert leader.is_leader and not standby.is_leader

        await leader.stop()
        stopped_at = time.monotonic()
        await standby.wait_leader(timeout=lease + 1.0)
        assert time.monotonic() - stopped_at <= lease + 0.5
        status = (await admin(nats_client, prefix, "status")).result
        assert status["coordinator_id"] == standby.coordinator_id
        assert status["macro_instances"][0]["members"] == ["inst-a"]
        await instance.report()

        async def dispatching() -> bool:
            reply = await submit(nats_client, prefix, make_submit("r-after", "router.x.tokens"))
            return isinstance(reply, SubmitAck)

        await eventually(dispatching)
        assert instance.dispatched[-1].request_id == "r-after"
    finally:
        for service in services:
            await service.stop()


async def test_a_killed_leader_is_replaced_after_its_lease(
    nats_server: EmbeddedServer, redis_server: EmbeddedServer, nats_client: NATS, ecoserve_prefix: str
) -> None:
    """SIGKILL: no clean release, so the standby must wait for the lease to lapse in Redis, then take over."""
    prefix = ecoserve_prefix
    lease = 1.0
    doomed = await spawn_coordinator(nats_server.url, redis_server.url, prefix, "doomed", lease=lease)
    try:
        await wait_serving(nats_client, prefix)
        config = coordinator_config(
            nats_server.url, redis_server.url, prefix, coordinator_id="heir", coordinator_lease_seconds=lease
        )
        async with running(config) as heir:
            assert not heir.is_leader
            doomed.kill()
            killed_at = time.monotonic()
            await doomed.wait()
            await heir.wait_leader(timeout=lease + 1.5)
            assert time.monotonic() - killed_at <= lease + 1.0
            assert (await admin(nats_client, prefix, "status")).result["coordinator_id"] == "heir"
    finally:
        if doomed.returncode is None:
            doomed.kill()
        await doomed.wait()
