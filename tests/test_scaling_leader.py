"""Mitosis scaling carried out on a real Leader (scaling_ops.LeaderOps) and administered over the wire
(admin `add-instance`, `remove-instance`, `scaling`, `status`): real NATS, real Redis, scripted instances.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from inspect import signature

import nats
import pytest_asyncio
import redis.asyncio as aioredis
from coordinator_support import FakeInstance, admin, eventually
from nats.aio.client import Client as NATS

from services.coordinator.admin import AdminService
from services.coordinator.admin_api import COMMANDS
from services.coordinator.admin_cli import render
from services.coordinator.leader import Leader
from services.coordinator.scaling import SPARE_POOL, ScalingController
from services.coordinator.scaling_ops import build_scaling, load_settings, ready_members
from services.coordinator.scaling_settings import ScalingSettings
from services.coordinator.scaling_store import settings_key
from services.coordinator.scheduling_config import SchedulingConfig
from services.coordinator.store import Snapshot, Store
from services.infra.embedded import EmbeddedServer
from shared import keys
from shared.messages import AdminRequest

SETTINGS = ScalingSettings(enabled=False, window=1.0, min_samples=1, hold=0.0, cooldown=0.0)


@dataclass
class Cluster:
    leader: Leader
    controller: ScalingController
    instances: dict[str, FakeInstance]


@pytest_asyncio.fixture
async def cluster(
    nats_server: EmbeddedServer, redis_client: aioredis.Redis, nats_client: NATS, ecoserve_prefix: str
) -> AsyncIterator[Cluster]:
    """A leader with instances a, b, c registered (all in m0), its scaling controller (N_l = 1, N_u = 3,
    autoscaling off), and the admin service. A leader without a controller of its own (before the leader
    builds one) gets one here, made the way the leader makes it."""
    leader_nc = await nats.connect(nats_server.url, allow_reconnect=False)
    leader = Leader(
        nc=leader_nc,
        store=Store(redis_client, ecoserve_prefix),
        prefix=ecoserve_prefix,
        coordinator_id="scaling-test",
        scheduling=SchedulingConfig(n_lower=1, n_upper=3),
        snapshot=Snapshot(),
        **_scaling_argument(),
    )
    await leader.start()
    instances = {i: FakeInstance(nats_client, ecoserve_prefix, i) for i in "abc"}
    for instance in instances.values():
        assert (await instance.start()).accepted  # type: ignore[union-attr]
        await instance.report(running=0)
    controller: ScalingController | None = getattr(leader, "scaling", None)
    if controller is None:
        controller = build_scaling(leader, await load_settings(redis_client, ecoserve_prefix, SETTINGS))
    assert controller.on_activation in leader.hooks.activation
    assert controller.on_status_delta in leader.hooks.status_delta
    service = AdminService(leader_nc, leader, scaling=controller)
    await service.start()
    try:
        yield Cluster(leader, controller, instances)
    finally:
        await service.stop()
        await leader.stop()
        for instance in instances.values():
            await instance.stop()
        await leader_nc.close()


def _scaling_argument() -> dict[str, ScalingSettings]:
    """The settings for a leader that takes them (one that builds its own controller)."""
    return {"scaling_settings": SETTINGS} if "scaling_settings" in signature(Leader).parameters else {}


async def members(redis: aioredis.Redis, prefix: str, macro: str) -> list[str]:
    return [m.decode() for m in await redis.lrange(keys.macro_members(prefix, macro), 0, -1)]


async def state(redis: aioredis.Redis, prefix: str, macro: str, instance_id: str) -> str | None:
    value = await redis.hget(keys.macro_state(prefix, macro), f"state:{instance_id}")
    return value.decode() if value is not None else None


async def test_remove_drain_spare_add_split_and_retire_through_the_leader(
    cluster: Cluster, redis_client: aioredis.Redis, nats_client: NATS, ecoserve_prefix: str
) -> None:
    prefix, leader, c = ecoserve_prefix, cluster.leader, cluster.instances["c"]
    assert cluster.controller.macros == {"m0": ["a", "b", "c"]}

    removed = await admin(nats_client, prefix, "remove-instance", instance_id="c")
    assert removed.ok, removed.error
    assert [(e["action"], e["instances"]) for e in removed.result["events"]] == [("remove", ["c"])]
    assert [control.command for control in c.controls] == ["drain"]
    assert await members(redis_client, prefix, "m0") == ["a", "b"]
    assert await members(redis_client, prefix, SPARE_POOL) == ["c"]
    assert await state(redis_client, prefix, SPARE_POOL, "c") == "draining"

    # Still holding a request: it stays draining; once its report is empty it is a spare.
    await c.report(running=1)
    await eventually(lambda: _reported(leader, "c", 1))
    await cluster.controller.tick(1.0)
    assert cluster.controller.draining == ["c"]
    await c.report(running=0)
    await eventually(lambda: _reported(leader, "c", 0))
    await cluster.controller.tick(2.0)
    assert cluster.controller.spares == ["c"]
    assert await state(redis_client, prefix, SPARE_POOL, "c") == "ready"

    # With N_u lowered to 2, m0 is full: it takes c back and splits its last N_l = 1 off as m1.
    assert (await admin(nats_client, prefix, "scaling-set", n_upper="2")).ok
    added = await admin(nats_client, prefix, "add-instance")
    assert added.ok, added.error
    assert [(e["action"], e["macros"]) for e in added.result["events"]] == [
        ("add", ["m0"]),
        ("split", ["m0", "m1"]),
    ]
    assert [control.command for control in c.controls] == ["drain", "resume"]
    assert (await members(redis_client, prefix, "m0"), await members(redis_client, prefix, "m1")) == (
        ["a", "b"],
        ["c"],
    )
    assert leader.registry.get("c").macro_instance_id == "m1" and leader.registry.get("c").state == "ready"
    # The overall scheduler weighs members that can take requests: c only once it reports ready again.
    await c.report(running=0, state="draining")
    await eventually(lambda: _reported(leader, "c", 0, "draining"))
    assert ready_members(leader.registry) == {"m0": 2, "m1": 0}
    assert {cluster.controller.choose_macro(ready_members(leader.registry)) for _ in range(3)} == {"m0"}
    await c.report(running=0)
    await eventually(lambda: _reported(leader, "c", 0))
    assert ready_members(leader.registry) == {"m0": 2, "m1": 1}
    assert sorted(cluster.controller.choose_macro(ready_members(leader.registry)) for _ in range(3)) == [
        "m0",
        "m0",
        "m1",
    ]

    status = await admin(nats_client, prefix, "status")
    assert status.ok, status.error
    assert [m["macro_instance_id"] for m in status.result["macro_instances"]] == ["m0", "m1"]  # no pool
    assert status.result["scaling"]["spares"] == []
    actions = [e["action"] for e in status.result["scaling_events"]]
    assert actions[-5:] == ["remove", "spare", "configure", "add", "split"]
    text = "\n".join(render(AdminRequest(command="status"), status.result))
    assert "spares: (none)" in text and "scaling: off (N_l=1 N_u=2" in text
    assert "recent scaling events:" in text and "m0 → m1" in text

    # Its macro instance's last member leaves: m1 is retired, its keys gone.
    assert (await admin(nats_client, prefix, "remove-instance", instance_id="c")).ok
    assert b"m1" not in await redis_client.smembers(keys.macro_instances(prefix))
    assert not await redis_client.exists(keys.macro_members(prefix, "m1"), keys.macro_state(prefix, "m1"))
    assert "m1" not in leader.registry.macro_instances()


async def _reported(leader: Leader, instance_id: str, running: int, state: str = "ready") -> bool:
    status = leader.registry.get(instance_id).status
    return status is not None and (status.num_running, status.state) == (running, state)


async def test_scaling_settings_and_bounds_over_the_wire(
    cluster: Cluster, redis_client: aioredis.Redis, nats_client: NATS, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    got = await admin(nats_client, prefix, "scaling-get")
    assert got.ok and got.result["scaling"]["enabled"] is False
    assert {"enabled", "hold", "n_lower", "n_upper", "ttft_slo"} <= set(got.result["keys"])

    changed = await admin(nats_client, prefix, "scaling-set", enabled="on", hold="2.5", n_upper="4")
    assert changed.ok, changed.error
    assert changed.result["changed"] == ["enabled", "hold", "n_upper"]
    view = changed.result["scaling"]
    assert (view["enabled"], view["settings"]["hold"], view["settings"]["n_upper"]) == (True, 2.5, 4)
    # Settings in scaling's own hash, the bound in the scheduling configuration (shared with PaDG).
    assert await redis_client.hgetall(settings_key(prefix)) == {b"enabled": b"on", b"hold": b"2.5"}
    assert await redis_client.hget(keys.config(prefix), "n_upper") == b"4"
    assert cluster.leader.scheduling.n_upper == 4
    text = render(AdminRequest(command="scaling-set"), changed.result)
    assert text[0] == "set enabled, hold, n_upper" and "hold = 2.5" in text and "enabled = on" in text

    for args, problem in (
        ({"bogus": "1"}, "unknown key 'bogus'"),
        ({"hold": "-1"}, "hold"),
        ({"n_lower": "3"}, "n_lower"),  # 2·3 − 1 > N_u = 4
        ({}, "at least one key"),
    ):
        refused = await admin(nats_client, prefix, "scaling-set", **args)
        assert not refused.ok and problem in (refused.error or ""), (args, refused.error)
    assert cluster.controller.config.n_lower == 1  # nothing of a refused command was applied

    for command, args, problem in (
        ("remove-instance", {"instance_id": "nobody"}, "not a member"),
        ("remove-instance", {}, "missing argument 'instance_id'"),
        ("add-instance", {}, "no spare instance"),
        ("add-instance", {"instance_id": "a", "macro_instance_id": "m0"}, "already in m0"),
    ):
        refused = await admin(nats_client, prefix, command, **args)
        assert not refused.ok and problem in (refused.error or ""), (command, refused.error)


async def test_without_a_controller_the_scaling_commands_say_so(
    nats_server: EmbeddedServer, redis_client: aioredis.Redis, nats_client: NATS, ecoserve_prefix: str
) -> None:
    leader_nc = await nats.connect(nats_server.url, allow_reconnect=False)
    leader = Leader(
        nc=leader_nc,
        store=Store(redis_client, ecoserve_prefix),
        prefix=ecoserve_prefix,
        coordinator_id="plain",
        scheduling=SchedulingConfig(),
        snapshot=Snapshot(),
    )
    service = AdminService(leader_nc, leader)
    await service.start()
    try:
        for command in ("add-instance", "remove-instance", "scaling-get", "scaling-set"):
            assert command in COMMANDS
            reply = await admin(nats_client, ecoserve_prefix, command)
            assert not reply.ok and "not running" in (reply.error or ""), command
        status = await admin(nats_client, ecoserve_prefix, "status")
        assert status.ok and "scaling" not in status.result
    finally:
        await service.stop()
        await leader_nc.close()
