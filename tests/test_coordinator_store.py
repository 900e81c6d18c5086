"""Redis persistence and the coordinator lease, against a real redis-server."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from coordinator_support import make_info

from services.coordinator.lease import CoordinatorLease
from services.coordinator.store import Store, StoredInstance, StoredWindow
from shared import keys
from shared.messages import InstanceInfo
from shared.wire import decode, encode


async def test_lease_is_exclusive_renewed_by_its_holder_and_taken_over_after_expiry(
    redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    key = keys.coordinator_lease(ecoserve_prefix, "m0")
    first = CoordinatorLease(redis_client, key, "coord-1", ttl_seconds=0.3)
    second = CoordinatorLease(redis_client, key, "coord-2", ttl_seconds=0.3)
    assert await first.acquire() and first.held
    assert 0 < first.remaining() <= 0.3
    assert not await second.acquire() and not second.held
    assert not await second.renew()
    await second.release()  # not its lease: nothing happens
    assert await first.current_holder() == "coord-1"
    assert await first.acquire()  # already ours (a restart with the same id)
    await asyncio.sleep(0.2)
    assert await first.renew()
    await asyncio.sleep(0.2)
    assert not await second.acquire()  # renewed, so still taken 0.4 s after the first acquire

    await asyncio.sleep(0.35)  # the holder stopped renewing (a crash): the lease lapses
    assert not first.held
    assert await second.acquire()
    assert not await first.renew()  # the old holder cannot take it back by renewing
    assert await second.current_holder() == "coord-2"
    await second.release()
    assert await redis_client.exists(key) == 0
    assert await first.acquire()
    await first.release()


async def test_store_round_trip_keeps_order_state_and_repairs(
    redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    store = Store(redis_client, ecoserve_prefix)
    for name in ("c", "a", "b"):
        await store.save_instance(make_info(name, ecoserve_prefix), "m0", "ready")
    await store.save_instance(make_info("d", ecoserve_prefix), "m1", "ready")
    await store.save_instance(
        make_info("a", ecoserve_prefix, kv_blocks_total=7), "m0", "ready"
    )  # re-register
    await store.save_state("b", "m0", "draining")
    await store.delete_instances([("c", "m0")])
    await store.save_config({"lease_seconds": "2.0"})

    # The documented layout, readable without the coordinator.
    members = keys.macro_members(ecoserve_prefix, "m0")
    assert await redis_client.lrange(members, 0, -1) == [b"a", b"b"]
    stored_a = await redis_client.hget(keys.instances(ecoserve_prefix), "a")
    assert decode(stored_a, InstanceInfo).kv_blocks_total == 7
    assert await redis_client.smembers(keys.macro_instances(ecoserve_prefix)) == {b"m0", b"m1"}
    state = await redis_client.hgetall(keys.macro_state(ecoserve_prefix, "m0"))
    assert state[b"state:b"] == b"draining" and b"state:c" not in state
    assert int(state[b"epoch"]) == 6  # c, a, b, a again, drain b, delete c

    # Damage: a member without a record, a record without a macro instance, an undecodable record.
    await redis_client.rpush(members, "ghost")
    await redis_client.hset(
        keys.instances(ecoserve_prefix), "orphan", encode(make_info("orphan", ecoserve_prefix))
    )
    await redis_client.hset(keys.instances(ecoserve_prefix), "junk", b"\xc1")
    snapshot = await store.load()
    assert [(s.info.instance_id, s.macro_instance_id, s.state) for s in snapshot.instances] == [
        ("a", "m0", "ready"),
        ("b", "m0", "draining"),
        ("d", "m1", "ready"),
        ("orphan", "m0", "ready"),
    ]
    assert isinstance(snapshot.instances[0], StoredInstance)
    assert snapshot.config == {b"lease_seconds": b"2.0"}
    assert len(snapshot.problems) == 2
    assert any("ghost" in p for p in snapshot.problems) and any("junk" in p for p in snapshot.problems)


async def test_instance_lease_key_expires(redis_client: aioredis.Redis, ecoserve_prefix: str) -> None:
    store = Store(redis_client, ecoserve_prefix)
    await store.touch_instance_lease("a", "coord-1", ttl_seconds=0.2)
    key = keys.instance_lease(ecoserve_prefix, "a")
    assert await redis_client.get(key) == b"coord-1"
    assert 0 < await redis_client.pttl(key) <= 200


async def test_padg_window_state_only_moves_to_newer_epochs_and_survives_reload(
    redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    store = Store(redis_client, ecoserve_prefix)
    for name in ("a", "b"):
        await store.save_instance(make_info(name, ecoserve_prefix), "m0", "ready")
    assert await store.save_window("m0", epoch=1, active="a", opened_at=10.5, opened=True)
    assert await store.save_window("m0", epoch=3, active="b", opened_at=12.0, opened=True)
    # Epoch 2 persisted last (concurrent tasks): counted, but it does not undo epoch 3.
    assert not await store.save_window("m0", epoch=2, active="a", opened_at=11.0, opened=True)
    window = (await store.load()).windows["m0"]
    assert window == StoredWindow(active="b", epoch=3, opened_at=12.0, opened={"a": 2, "b": 1})
    assert await store.load_window("m0") == window
    # Nothing active any more (policy switched away), under a new epoch.
    assert await store.save_window("m0", epoch=4, active=None, opened_at=0.0, opened=False)
    assert await store.load_window("m0") == StoredWindow(epoch=4, opened={"a": 2, "b": 1})

    # Mitosis moves b to m1: it leaves m0's order, state and window counts.
    await store.move_instance("b", "m0", "m1", "draining")
    assert await redis_client.lrange(keys.macro_members(ecoserve_prefix, "m0"), 0, -1) == [b"a"]
    snapshot = await store.load()
    assert [(s.info.instance_id, s.macro_instance_id, s.state) for s in snapshot.instances] == [
        ("a", "m0", "ready"),
        ("b", "m1", "draining"),
    ]
    assert snapshot.windows["m0"].opened == {"a": 2}

    await redis_client.hset(
        keys.macro_state(ecoserve_prefix, "m1"), mapping={"window_epoch": "x", "windows:b": "y"}
    )
    snapshot = await store.load()
    assert snapshot.windows["m1"] == StoredWindow() and len(snapshot.problems) == 2
