"""The coordinator on real NATS and Redis: the test plays instances (register, status, answering dispatches)
and a router (submits, token and instance_lost subscriptions)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest
import redis.asyncio as aioredis
from coordinator_support import (
    FakeInstance,
    admin,
    coordinator_config,
    eventually,
    instance_view,
    make_info,
    make_status,
    make_submit,
    running,
    submit,
)
from nats.aio.client import Client as NATS

from services.coordinator.admin_api import COMMANDS, endpoint_subject
from services.infra.embedded import EmbeddedServer
from shared import keys, subjects
from shared.messages import (
    AdminReply,
    AdminRequest,
    DispatchRequest,
    ErrorReply,
    InstanceLost,
    InstanceStatus,
    RegisterAck,
    RegisterInstance,
    SubmitAck,
    TokenChunk,
)
from shared.wire import Message, decode, encode


@pytest.fixture
def config_for(nats_server: EmbeddedServer, redis_server: EmbeddedServer, ecoserve_prefix: str):
    def make(**overrides: object):
        return coordinator_config(nats_server.url, redis_server.url, ecoserve_prefix, **overrides)

    return make


async def reported(nc: NATS, prefix: str, instance: FakeInstance, **load: int) -> None:
    """Send a status report and wait until the coordinator shows it."""
    await instance.report(**load)
    expected = {"num_running": load.get("running", 0), "num_waiting": load.get("waiting", 0)}

    async def seen() -> bool:
        view = await instance_view(nc, prefix, instance.instance_id)
        return view is not None and view["reported_state"] == "ready" and expected.items() <= view.items()

    await eventually(seen)


async def test_submit_goes_to_the_least_loaded_instance(
    config_for, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(config_for()):
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        b = FakeInstance(nats_client, ecoserve_prefix, "inst-b")
        ack = await a.start()
        assert ack == RegisterAck(accepted=True, macro_instance_id="m0", lease_seconds=3.0)
        await b.start()
        await reported(nats_client, ecoserve_prefix, a, running=3)
        await reported(nats_client, ecoserve_prefix, b, running=1)

        sent = [
            await submit(nats_client, ecoserve_prefix, make_submit(f"r{i}", "router.x.tokens"))
            for i in range(3)
        ]
        # b: 1 running + 0, then + 1 outstanding → 2 < 3; then 3 = 3 ties with a and the smaller id wins.
        assert [s.instance_id for s in sent if isinstance(s, SubmitAck)] == ["inst-b", "inst-b", "inst-a"]
        assert [d.request_id for d in b.dispatched] == ["r0", "r1"]
        dispatched = b.dispatched[0]
        assert isinstance(dispatched, DispatchRequest)
        assert (dispatched.instance_id, dispatched.reply_subject, dispatched.prompt_token_ids) == (
            "inst-b",
            "router.x.tokens",
            [1, 2, 3],
        )
        assert abs(dispatched.dispatch_time - time.time()) < 5


async def test_unavailable_and_overloaded(config_for, nats_client: NATS, ecoserve_prefix: str) -> None:
    async with running(config_for()):
        empty = await submit(nats_client, ecoserve_prefix, make_submit("r0", "router.x.tokens"))
        assert isinstance(empty, ErrorReply)
        assert empty.code == "unavailable"
        assert empty.retry_after is not None and empty.retry_after > 0

        assert (await admin(nats_client, ecoserve_prefix, "config-set", max_waiting_per_instance=2)).ok
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        await a.start()
        await reported(nats_client, ecoserve_prefix, a, running=5, waiting=1)
        assert isinstance(
            await submit(nats_client, ecoserve_prefix, make_submit("r1", "router.x.tokens")), SubmitAck
        )
        # waiting 1 + outstanding 1 = 2: the queue is full.
        full = await submit(nats_client, ecoserve_prefix, make_submit("r2", "router.x.tokens"))
        assert isinstance(full, ErrorReply)
        assert full.code == "overloaded"
        assert full.retry_after is not None and full.retry_after > 0
        assert [d.request_id for d in a.dispatched] == ["r1"]


async def test_instance_errors_pass_through_or_fall_over(
    config_for, nats_client: NATS, ecoserve_prefix: str
) -> None:
    def bad_request(request: DispatchRequest) -> Message:
        return ErrorReply(
            code="bad_request", message="temperature must be >= 0", field="sampling.temperature"
        )

    def draining(request: DispatchRequest) -> Message:
        return ErrorReply(code="unavailable", message="draining")

    async with running(config_for()):
        picky = FakeInstance(nats_client, ecoserve_prefix, "inst-a", answer=bad_request)
        await picky.start()
        await reported(nats_client, ecoserve_prefix, picky)
        reply = await submit(nats_client, ecoserve_prefix, make_submit("r0", "router.x.tokens"))
        assert reply == ErrorReply(
            code="bad_request", message="temperature must be >= 0", field="sampling.temperature"
        )

        # An instance that turns the request away (draining) or is not listening is skipped, not reported.
        picky.answer = draining
        deaf = FakeInstance(nats_client, ecoserve_prefix, "inst-0")
        await deaf.start()
        await deaf.stop()  # registered, but nobody answers on its subjects
        willing = FakeInstance(nats_client, ecoserve_prefix, "inst-z")
        await willing.start()
        await reported(nats_client, ecoserve_prefix, willing, running=4)
        reply = await submit(nats_client, ecoserve_prefix, make_submit("r1", "router.x.tokens"))
        assert reply == SubmitAck(request_id="r1", instance_id="inst-z")
        assert [d.request_id for d in picky.dispatched] == ["r0", "r1"]

        willing.answer = draining
        refused = await submit(nats_client, ecoserve_prefix, make_submit("r2", "router.x.tokens"))
        assert isinstance(refused, ErrorReply) and refused.code == "unavailable"
        assert "inst-z" in refused.message and "draining" in refused.message


async def test_malformed_messages_are_answered_and_survived(
    config_for, nats_client: NATS, ecoserve_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.coordinator")
    async with running(config_for()):
        request_subjects = [subjects.submit(ecoserve_prefix), subjects.register(ecoserve_prefix)]
        request_subjects += [endpoint_subject(ecoserve_prefix, command) for command in COMMANDS]
        wrong_type = encode(AdminReply(ok=True))
        for subject in request_subjects:
            for garbage in (b"\xc1not msgpack", wrong_type):
                reply = decode((await nats_client.request(subject, garbage, timeout=5)).data)
                assert isinstance(reply, ErrorReply), subject
                assert reply.code == "bad_message", subject
        # Publish-only subjects: logged and dropped.
        for subject in (subjects.status(ecoserve_prefix, "inst-a"), subjects.deregister(ecoserve_prefix)):
            await nats_client.publish(subject, b"\x00garbage")
            await nats_client.publish(subject, wrong_type)
        # A status on another instance's subject is not believed either.
        impostor = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        await impostor.start()
        await nats_client.publish(
            subjects.status(ecoserve_prefix, "inst-b"), encode(make_status("inst-a", running=9))
        )

        async def all_dropped() -> bool:
            return (
                caplog.text.count("dropped a status report") == 3
                and caplog.text.count("dropped a deregister message") == 2
                and "status of 'inst-a' arrived on" in caplog.text
            )

        await eventually(all_dropped)
        status = await admin(nats_client, ecoserve_prefix, "status")
        assert status.ok and status.result["leader"]
        assert [i["num_running"] for i in status.result["instances"]] == [0]
        # The coordinator still dispatches.
        ack = await submit(nats_client, ecoserve_prefix, make_submit("r0", "router.x.tokens"))
        assert ack == SubmitAck(request_id="r0", instance_id="inst-a")


async def test_register_refuses_unusable_ids_and_subjects(
    config_for, nats_client: NATS, ecoserve_prefix: str
) -> None:
    good = make_info("inst-a", ecoserve_prefix)
    wildcard = dataclasses.replace(good.subjects, requests=f"{ecoserve_prefix}.instance.*.requests")
    async with running(config_for()):
        for info, problem in (
            (dataclasses.replace(good, instance_id="inst a"), "instance_id"),
            (dataclasses.replace(good, subjects=wildcard), "info.subjects.requests"),
        ):
            answer = await nats_client.request(
                subjects.register(ecoserve_prefix), encode(RegisterInstance(info=info)), timeout=5
            )
            ack = decode(answer.data, RegisterAck)
            assert not ack.accepted and ack.macro_instance_id is None and problem in ack.message
        assert (await admin(nats_client, ecoserve_prefix, "instances")).result["instances"] == []


async def test_the_lease_key_holds_the_latest_status_for_routers(
    config_for, nats_client: NATS, redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    async with running(config_for(lease_seconds=0.6)):
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        await a.start()
        lease_key = keys.instance_lease(ecoserve_prefix, "inst-a")
        assert await redis_client.get(lease_key) == b"ready", "before its first report: the state"

        async def lease_shows(running: int) -> bool:
            raw = await redis_client.get(lease_key)
            if raw is None or raw == b"ready":
                return False
            status = decode(raw, InstanceStatus)
            return status.instance_id == "inst-a" and status.num_running == running

        await a.report(running=2)
        await eventually(lambda: lease_shows(2))  # the first report is written at once
        for _ in range(6):  # later ones at most every lease/3 s
            await a.report(running=5)
            await asyncio.sleep(0.1)
        assert await lease_shows(5)


async def test_silent_instance_is_lost_and_its_requests_failed(
    config_for, nats_client: NATS, redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    lease = 0.6
    async with running(config_for(lease_seconds=lease)):
        lost_sub = await nats_client.subscribe(subjects.instance_lost(ecoserve_prefix))
        tokens = await nats_client.subscribe("router.lost.tokens")
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        assert (await a.start()).lease_seconds == lease
        await reported(nats_client, ecoserve_prefix, a)
        assert await redis_client.hexists(keys.instances(ecoserve_prefix), "inst-a")
        assert await redis_client.exists(keys.instance_lease(ecoserve_prefix, "inst-a"))
        ack = await submit(nats_client, ecoserve_prefix, make_submit("r0", "router.lost.tokens", [5, 6]))
        assert ack == SubmitAck(request_id="r0", instance_id="inst-a")
        await a.report(running=1, request_ids=("r0",))
        silent_since = time.monotonic()

        lost = decode((await lost_sub.next_msg(timeout=lease + 2)).data, InstanceLost)
        assert time.monotonic() - silent_since < lease + 1.0
        assert lost.instance_id == "inst-a" and "no status" in lost.reason
        chunk = decode((await tokens.next_msg(timeout=2)).data, TokenChunk)
        assert (chunk.request_id, chunk.finished, chunk.finish_reason) == ("r0", True, "error")
        assert chunk.error and "inst-a" in chunk.error
        assert chunk.prompt_tokens == 2 and chunk.completion_tokens == 1
        assert await instance_view(nats_client, ecoserve_prefix, "inst-a") is None
        assert not await redis_client.hexists(keys.instances(ecoserve_prefix), "inst-a")
        assert await redis_client.lrange(keys.macro_members(ecoserve_prefix, "m0"), 0, -1) == []

        # It was only slow: its next report gets it asked to register again.
        await a.report()

        async def asked() -> bool:
            return any(c.command == "register" for c in a.controls)

        await eventually(asked)


async def test_deregister_removes_without_failing_requests(
    config_for, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(config_for()):
        lost_sub = await nats_client.subscribe(subjects.instance_lost(ecoserve_prefix))
        tokens = await nats_client.subscribe("router.dereg.tokens")
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        await a.start()
        assert isinstance(
            await submit(nats_client, ecoserve_prefix, make_submit("r0", "router.dereg.tokens")), SubmitAck
        )
        await a.deregister()

        async def gone() -> bool:
            return await instance_view(nats_client, ecoserve_prefix, "inst-a") is None

        await eventually(gone)
        await a.report()  # a last report while exiting must not get it re-registered
        await asyncio.sleep(0.3)  # time for a (wrong) "register" command to arrive
        status = await admin(nats_client, ecoserve_prefix, "status")
        assert status.result["instances"] == [] and a.controls == []
        for subscription in (lost_sub, tokens):
            assert subscription.pending_msgs == 0


async def test_a_restarted_instance_fails_the_requests_of_its_old_process(
    config_for, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(config_for()):
        tokens = await nats_client.subscribe("router.restart.tokens")
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        await a.start()
        assert isinstance(
            await submit(nats_client, ecoserve_prefix, make_submit("r0", "router.restart.tokens")), SubmitAck
        )
        a.info = dataclasses.replace(a.info, pid=a.info.pid + 1, started_at=a.info.started_at + 60)
        assert (await a.register()).accepted
        chunk = decode((await tokens.next_msg(timeout=5)).data, TokenChunk)
        assert (chunk.request_id, chunk.finish_reason) == ("r0", "error")
        assert chunk.error and "restarted" in chunk.error


async def test_admin_drain_resume_remove(config_for, nats_client: NATS, ecoserve_prefix: str) -> None:
    async with running(config_for()):
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        b = FakeInstance(nats_client, ecoserve_prefix, "inst-b")
        await a.start()
        await b.start()
        await reported(nats_client, ecoserve_prefix, b, running=5)

        drained = await admin(nats_client, ecoserve_prefix, "drain", instance_id="inst-a")
        assert (
            drained.ok and drained.result["state"] == "draining" and drained.result["instance_acknowledged"]
        )
        assert [c.command for c in a.controls] == ["drain"]
        for i in range(3):
            ack = await submit(nats_client, ecoserve_prefix, make_submit(f"r{i}", "router.x.tokens"))
            assert ack == SubmitAck(request_id=f"r{i}", instance_id="inst-b")
        assert a.dispatched == []
        view = await instance_view(nats_client, ecoserve_prefix, "inst-a")
        assert view is not None and view["state"] == "draining" and not view["dispatchable"]

        assert (await admin(nats_client, ecoserve_prefix, "resume", instance_id="inst-a")).ok
        ack = await submit(nats_client, ecoserve_prefix, make_submit("r3", "router.x.tokens"))
        assert ack == SubmitAck(request_id="r3", instance_id="inst-a")

        removed = await admin(nats_client, ecoserve_prefix, "remove", instance_id="inst-b")
        assert removed.ok and removed.result["state"] == "removing"
        assert [c.command for c in b.controls] == ["shutdown"]

        for command in ("drain", "resume", "remove"):
            unknown = await admin(nats_client, ecoserve_prefix, command, instance_id="inst-nope")
            assert not unknown.ok and unknown.error is not None and "inst-nope" in unknown.error
        missing = await admin(nats_client, ecoserve_prefix, "drain")
        assert not missing.ok and "instance_id" in (missing.error or "")


async def test_admin_config_get_and_set(config_for, nats_client: NATS, ecoserve_prefix: str) -> None:
    async with running(config_for(lease_seconds=2.5)):
        got = await admin(nats_client, ecoserve_prefix, "config-get")
        assert got.result["config"] == {
            "dispatch_policy": "least_loaded",
            "max_waiting_per_instance": 1024,
            "lease_seconds": 2.5,
            "dispatch_timeout": 5.0,
            "ttft_slo": 5.0,
            "tpot_slo": 0.1,
            "padg_variant": "paper",
            "prefill_rule": "interpolate",
            "hold_outputs": False,
            "pending_timeout": 5.0,
            "n_lower": 3,
            "n_upper": 6,
        }
        changed = await admin(
            nats_client, ecoserve_prefix, "config-set", lease_seconds="4", dispatch_timeout=1
        )
        assert changed.ok and changed.result["changed"] == ["dispatch_timeout", "lease_seconds"]
        assert (await admin(nats_client, ecoserve_prefix, "config-get")).result["config"][
            "lease_seconds"
        ] == 4.0
        # New registrations are told the new lease.
        a = FakeInstance(nats_client, ecoserve_prefix, "inst-a")
        assert (await a.start()).lease_seconds == 4.0

        for bad, key in (
            ({"lease_seconds": "soon"}, "lease_seconds"),
            ({"colour": "red"}, "colour"),
            ({}, ""),
        ):
            refused = await admin(nats_client, ecoserve_prefix, "config-set", **bad)
            assert not refused.ok and refused.error is not None and key in refused.error
        mismatched = await nats_client.request(
            endpoint_subject(ecoserve_prefix, "status"), encode(AdminRequest(command="drain")), timeout=5
        )
        reply = decode(mismatched.data, AdminReply)
        assert not reply.ok and "drain" in (reply.error or "")
