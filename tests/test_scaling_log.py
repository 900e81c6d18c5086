"""The scaling event stream (scaling_log.py) and the scaling settings hash (scaling_store.py), on real
Redis."""

from __future__ import annotations

import math

import pytest
import redis.asyncio as aioredis
from test_scaling import OFF, RecordingOps

from services.coordinator.scaling import ScalingController
from services.coordinator.scaling_log import ScalingEvent, ScalingLog
from services.coordinator.scaling_settings import ScalingSettings
from services.coordinator.scaling_store import ScalingStore, settings_key
from shared import keys


def event(n: int, **fields: object) -> ScalingEvent:
    base: dict[str, object] = dict(
        time=1_700_000_000.0 + n,
        action="add",
        cause="expand",
        macros=("m0",),
        instances=(f"i{n}",),
        reason=f"event {n}",
        mean_ttft=1.25,
        slack_ratio=None,
    )
    return ScalingEvent(**{**base, **fields})  # type: ignore[arg-type]


async def test_events_round_trip_in_order(redis_client: aioredis.Redis, ecoserve_prefix: str) -> None:
    log = ScalingLog(redis_client, ecoserve_prefix)
    written = [
        event(0),
        event(1, action="split", macros=("m0", "m1"), instances=("a", "b", "c"), slack_ratio=math.inf),
        event(2, action="configure", cause="config", macros=(), instances=(), mean_ttft=None),
    ]
    ids = await log.append(written)
    assert len(ids) == 3 and ids == sorted(ids)
    assert await redis_client.xlen(keys.scaling_events(ecoserve_prefix)) == 3
    read = await log.recent(10)
    assert [e.event_id for e in read] == ids
    assert [e.__class__(**{**_fields(e), "event_id": None}) for e in read] == written
    assert read[1].to_dict()["slack_ratio"] == "inf" and read[1].to_dict()["macros"] == ["m0", "m1"]
    assert [e.reason for e in await log.recent(2)] == ["event 1", "event 2"]  # the last two, oldest first
    assert await log.recent(0) == []
    assert await ScalingLog(redis_client, ecoserve_prefix + "x").recent(5) == []


def _fields(e: ScalingEvent) -> dict[str, object]:
    return {name: getattr(e, name) for name in ScalingEvent.__slots__}


async def test_the_stream_is_bounded(redis_client: aioredis.Redis, ecoserve_prefix: str) -> None:
    log = ScalingLog(redis_client, ecoserve_prefix, maxlen=10)
    for start in range(0, 1000, 100):
        await log.append([event(n) for n in range(start, start + 100)])
    length = await redis_client.xlen(log.key)
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): near the bound, far below 1000.
    assert 10 <= length <= 10 + 100
    assert [e.reason for e in await log.recent(3)] == ["event 997", "event 998", "event 999"]
    with pytest.raises(ValueError, match="maxlen"):
        ScalingLog(redis_client, ecoserve_prefix, maxlen=0)


async def test_entries_written_by_hand_are_read_without_failing(
    redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    log = ScalingLog(redis_client, ecoserve_prefix)
    await redis_client.xadd(log.key, {"action": "merge", "time": "soon", "mean_ttft": "x"})
    (read,) = await log.recent(1)
    assert (read.action, read.time, read.mean_ttft, read.macros) == ("merge", 0.0, None, ())


async def test_settings_persist_only_what_was_set(redis_client: aioredis.Redis, ecoserve_prefix: str) -> None:
    store = ScalingStore(redis_client, ecoserve_prefix)
    defaults = ScalingSettings(window=20.0)
    assert await store.load(defaults) == (defaults, [])
    changed = {"enabled": "on", "cooldown": 5}
    await store.save(defaults.updated(changed), changed)
    assert await redis_client.hgetall(settings_key(ecoserve_prefix)) == {
        b"enabled": b"on",
        b"cooldown": b"5.0",
    }
    await redis_client.hset(settings_key(ecoserve_prefix), mapping={"hold": "-1", "color": "red"})
    loaded, problems = await store.load(ScalingSettings(window=25.0))
    assert (loaded.enabled, loaded.cooldown, loaded.window, loaded.hold) == (True, 5.0, 25.0, 10.0)
    assert sorted(p.split(":")[0] for p in problems) == ["color", "hold"]


async def test_the_controller_logs_to_redis_and_persists_settings(
    redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    ops = RecordingOps({"m0": ["a", "b"]})
    log = ScalingLog(redis_client, ecoserve_prefix)
    store = ScalingStore(redis_client, ecoserve_prefix)
    config = OFF.mitosis_config(n_lower=1, n_upper=2, ttft_slo=1.0)
    controller = ScalingController(ops, config, OFF, events=log, store=store, clock=lambda: 1234.5)
    assert ops.register(controller, "c") == "m0"  # m0 is over N_u = 2 now: the tick splits it
    await controller.tick(0.0)
    await controller.update_settings({"hold": "3"}, 1.0)
    await controller.remove_instance(2.0, "c")
    read = await controller.recent_events(10)
    assert [(e.action, e.cause, e.macros, e.instances) for e in read] == [
        ("add", "join", ("m0",), ("c",)),
        ("split", "join", ("m0", "m1"), ("c",)),
        ("configure", "config", (), ()),
        ("remove", "manual", ("m1",), ("c",)),  # its last member: m1 is gone
    ]
    assert ("retire", "m1") in ops.calls and controller.macros == {"m0": ["a", "b"]}
    assert {e.time for e in read} == {1234.5}
    assert read[2].reason == "hold=3.0"
    assert (await store.load(ScalingSettings()))[0].hold == 3.0
