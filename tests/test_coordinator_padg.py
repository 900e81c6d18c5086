"""The coordinator's PaDG dispatch on real NATS and Redis: the test plays padg-policy instances over the wire
(register with a prefill profile, apply PrefillWindow orders by epoch, report their window and requests) and
a router (submits). Every instance is priced at 10 ms per prompt token; with a 1 s TTFT SLO a prefill window
takes two 40-token prompts (0.8 s), and the third rolls the activation to the next instance."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
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
from nats.aio.msg import Msg

from services.infra.embedded import EmbeddedServer
from shared import keys, subjects
from shared.messages import (
    AdminReply,
    ErrorReply,
    InstanceControl,
    InstanceStatus,
    PrefillWindow,
    RequestProgress,
    SubmitAck,
)
from shared.prefill_profile import PrefillProfile
from shared.wire import decode, encode

PROFILE = PrefillProfile(
    points=[(1, 0.01), (100, 1.0)], kv_blocks_total=100, block_size=16, measured_at=0, threads=1
)
PROMPT = list(range(1, 41))  # 40 tokens: 0.4 s predicted


class PadgInstance(FakeInstance):
    """A padg-policy instance as the coordinator sees it: applies PrefillWindow orders like the real one
    (ignoring epochs below the last applied) and reports its window, requests and their first tokens."""

    def __init__(self, nc: NATS, prefix: str, instance_id: str, *, profile: PrefillProfile | None = PROFILE):
        super().__init__(nc, prefix, instance_id)
        self.info = dataclasses.replace(
            self.info, policy="padg", prefill_profile=profile.to_dict() if profile else None
        )
        self.windows: list[PrefillWindow] = []
        self.window_open = False
        self.window_epoch = 0
        self.prefilled: dict[str, float] = {}  # request → first token time

    async def _on_control(self, msg: Msg) -> None:
        message = decode(msg.data, (InstanceControl, PrefillWindow))
        if isinstance(message, PrefillWindow):
            self.windows.append(message)
            if message.epoch >= self.window_epoch:
                self.window_open, self.window_epoch = message.active, message.epoch
        else:
            self.controls.append(message)
        await msg.respond(encode(AdminReply(ok=True)))

    def orders(self) -> list[tuple[bool, int]]:
        return [(w.active, w.epoch) for w in self.windows]

    async def report_window(self, *, prefilled: bool = False, output_tokens: int = 10) -> None:
        """Report every request dispatched here (prefilled now when `prefilled`)."""
        now = time.time()
        requests = []
        for request in self.dispatched:
            if prefilled:
                self.prefilled.setdefault(request.request_id, now)
            first = self.prefilled.get(request.request_id)
            requests.append(
                RequestProgress(
                    request_id=request.request_id,
                    prompt_tokens=len(request.prompt_token_ids),
                    output_tokens=output_tokens if first else 0,
                    arrival_time=request.arrival_time,
                    first_token_time=first,
                )
            )
        self.seq += 1
        status = InstanceStatus(
            instance_id=self.instance_id,
            seq=self.seq,
            time=now,
            state="ready",
            phase="prefill" if self.window_open else "decode",
            num_running=len(requests),
            num_waiting=0,
            kv_blocks_free=100,
            kv_blocks_total=100,
            num_preemptions=0,
            requests=requests,
            prefill_window=self.window_open,
            window_epoch=self.window_epoch,
        )
        await self.nc.publish(subjects.status(self.prefix, self.instance_id), encode(status))


@pytest.fixture
def padg_config(nats_server: EmbeddedServer, redis_server: EmbeddedServer, ecoserve_prefix: str):
    def make(**overrides: Any):
        settings = {
            "dispatch_policy": "padg",
            "ttft_slo": 1.0,
            "tpot_slo": 1.0,
            "lease_seconds": 10.0,
            "pending_timeout": 5.0,
        } | overrides
        return coordinator_config(nats_server.url, redis_server.url, ecoserve_prefix, **settings)

    return make


async def start_members(nc: NATS, prefix: str, *ids: str) -> dict[str, PadgInstance]:
    members = {i: PadgInstance(nc, prefix, i) for i in ids}
    for member in members.values():
        assert (await member.start()).accepted
        await member.report_window()
    for member in members.values():
        await eventually(lambda m=member: _dispatchable(nc, prefix, m.instance_id))
    return members


async def _dispatchable(nc: NATS, prefix: str, instance_id: str) -> bool:
    instances = (await admin(nc, prefix, "instances")).result["instances"]
    return any(i["instance_id"] == instance_id and i["dispatchable"] for i in instances)


async def send(nc: NATS, prefix: str, request_id: str) -> Any:
    return await submit(nc, prefix, make_submit(request_id, "router.x.tokens", PROMPT))


async def macro_state(nc: NATS, prefix: str) -> dict[str, Any]:
    (macro,) = (await admin(nc, prefix, "status")).result["macro_instances"]
    return macro


async def test_windows_roll_through_the_members_and_persist(
    padg_config, nats_client: NATS, redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    async with running(padg_config()):
        m = await start_members(nats_client, prefix, "a", "b", "c")
        acks = [await send(nats_client, prefix, f"r{i}") for i in range(6)]
        assert [ack.instance_id for ack in acks] == ["a", "a", "b", "b", "c", "c"]
        await eventually(
            lambda: _async(m["c"].window_open and not m["b"].window_open and not m["a"].window_open)
        )
        assert m["a"].orders() == [(True, 1), (False, 2)]
        assert m["b"].orders() == [(True, 2), (False, 3)]
        assert m["c"].orders() == [(True, 3)]
        assert all(w.ttft_slo == 1.0 and not w.hold_outputs for i in m.values() for w in i.windows)
        macro = await macro_state(nats_client, prefix)
        assert (macro["policy"], macro["active"], macro["window_epoch"]) == ("padg", "c", 3)
        assert macro["windows_opened"] == {"a": 1, "b": 1, "c": 1} and macro["pending"] == 0
        state = await redis_client.hgetall(keys.macro_state(prefix, "m0"))
        assert (state[b"active"], state[b"window_epoch"], state[b"windows:a"]) == (b"c", b"3", b"1")

        # Every window is full (and a, b still hold unprefilled prompts): the next request waits…
        waiting = asyncio.create_task(send(nats_client, prefix, "r6"))
        await eventually(lambda: _pending(nats_client, prefix, 1))
        # …until a reports its prompts prefilled, with decode slack to spare: a opens its second window.
        await m["a"].report_window(prefilled=True)
        ack = await asyncio.wait_for(waiting, 5)
        assert isinstance(ack, SubmitAck) and ack.instance_id == "a"
        await eventually(
            lambda: _async(m["a"].orders()[-1] == (True, 4) and m["c"].orders()[-1] == (False, 4))
        )
        macro = await macro_state(nats_client, prefix)
        assert macro["windows_opened"] == {"a": 2, "b": 1, "c": 1} and macro["window_epoch"] == 4


async def test_a_pending_request_times_out_with_overloaded(
    padg_config, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(padg_config(pending_timeout=0.3)):
        await start_members(nats_client, ecoserve_prefix, "a", "b")
        for i in range(4):
            assert isinstance(await send(nats_client, ecoserve_prefix, f"r{i}"), SubmitAck)
        started = time.monotonic()
        refused = await send(nats_client, ecoserve_prefix, "r4")
        assert isinstance(refused, ErrorReply) and refused.code == "overloaded" and refused.retry_after
        assert "0.3s" in refused.message and time.monotonic() - started >= 0.3
        assert (await macro_state(nats_client, ecoserve_prefix))["pending"] == 0


async def test_the_authors_variant_switches_instead_of_waiting(
    padg_config, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(padg_config(padg_variant="authors")):
        await start_members(nats_client, ecoserve_prefix, "a", "b")
        acks = [await send(nats_client, ecoserve_prefix, f"r{i}") for i in range(5)]
        assert [ack.instance_id for ack in acks] == ["a", "a", "b", "b", "a"]
        assert (await macro_state(nats_client, ecoserve_prefix))["window_epoch"] == 3


async def test_an_instance_without_a_profile_is_kept_out_with_a_reason(
    padg_config, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(padg_config()):
        blind = PadgInstance(nats_client, ecoserve_prefix, "blind", profile=None)
        assert (await blind.start()).accepted  # registered all the same (least_loaded could use it)
        await blind.report_window()
        refused = await send(nats_client, ecoserve_prefix, "r0")
        assert isinstance(refused, ErrorReply) and refused.code == "unavailable"
        assert "blind" in refused.message and "no prefill profile" in refused.message
        macro = await macro_state(nats_client, ecoserve_prefix)
        assert "no prefill profile" in macro["excluded"]["blind"]
        assert blind.dispatched == []


async def test_a_new_coordinator_resumes_the_activation_and_epochs_keep_growing(
    padg_config, nats_client: NATS, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    async with running(padg_config(coordinator_id="first")):
        m = await start_members(nats_client, prefix, "a", "b", "c")
        acks = [await send(nats_client, prefix, f"r{i}") for i in range(3)]
        assert [ack.instance_id for ack in acks] == ["a", "a", "b"]
        await eventually(lambda: _async(m["b"].window_open and not m["a"].window_open))
    # a's close order is lost with the old coordinator (as if it never arrived).
    m["a"].window_open, m["a"].window_epoch = True, 1
    before = {i: len(member.windows) for i, member in m.items()}

    async with running(padg_config(coordinator_id="second")):
        macro = await macro_state(nats_client, prefix)
        assert (macro["active"], macro["window_epoch"], macro["windows_opened"]) == ("b", 2, {"a": 1, "b": 1})
        for member in m.values():
            await member.report_window()
        # b is told again (same epoch, idempotent); a, whose window is open, is closed.
        await eventually(
            lambda: _async(len(m["b"].windows) > before["b"] and len(m["a"].windows) > before["a"])
        )
        assert m["b"].orders()[before["b"] :] == [(True, 2)]
        assert m["a"].orders()[before["a"] :] == [(False, 2)]
        assert m["c"].orders() == []
        # b's window still holds r2 (carried over as unprefilled work): r3 fits, r4 rolls on to c at epoch 3.
        await eventually(lambda: _dispatchable(nats_client, prefix, "b"))
        acks = [await send(nats_client, prefix, f"r{i}") for i in (3, 4)]
        assert [ack.instance_id for ack in acks] == ["b", "c"]
        await eventually(lambda: _async(m["c"].orders() == [(True, 3)]))


async def test_switching_the_policy_at_run_time(padg_config, nats_client: NATS, ecoserve_prefix: str) -> None:
    prefix = ecoserve_prefix
    async with running(padg_config()):
        m = await start_members(nats_client, prefix, "a", "b")
        assert (await send(nats_client, prefix, "r0")).instance_id == "a"
        switched = await admin(nats_client, prefix, "config-set", dispatch_policy="least_loaded")
        assert switched.ok
        # Nobody rolls windows any more: every member's window is opened, under a new epoch.
        assert m["a"].window_open and m["b"].window_open and m["b"].window_epoch == 2
        assert (await macro_state(nats_client, prefix))["policy"] == "least_loaded"
        assert (await send(nats_client, prefix, "r1")).instance_id == "b"  # least loaded
        assert (await admin(nats_client, prefix, "config-set", dispatch_policy="padg")).ok
        for member in m.values():
            await member.report_window()
        ack = await send(nats_client, prefix, "r2")
        assert isinstance(ack, SubmitAck)
        # PaDG takes over above the last epoch and closes the window of the member it did not activate.
        idle = m["b" if ack.instance_id == "a" else "a"]
        await eventually(lambda: _async(not idle.window_open))
        assert (await macro_state(nats_client, prefix))["window_epoch"] == 3


async def _async(value: bool) -> bool:
    return value


async def _pending(nc: NATS, prefix: str, count: int) -> bool:
    return (await macro_state(nc, prefix))["pending"] == count


async def test_hooks_see_activations_and_ttfts_and_a_moved_instance_leaves_the_cycle(
    padg_config, nats_client: NATS, redis_client: aioredis.Redis, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    async with running(padg_config()) as service:
        leader = service.leader
        assert leader is not None
        activations: list[tuple[str, str, str | None, int]] = []
        ttfts: list[tuple[str, str, tuple[str, ...]]] = []
        leader.hooks.activation.append(lambda m, a, e: activations.append((m, a.activate, a.deactivate, e)))
        leader.hooks.status_delta.append(lambda m, i, d: ttfts.append((m, i, tuple(r for r, _ in d.ttfts))))
        m = await start_members(nats_client, prefix, "a", "b", "c")
        assert (await send(nats_client, prefix, "r0")).instance_id == "a"
        assert activations == [("m0", "a", None, 1)]
        await m["a"].report_window(prefilled=True)
        await eventually(lambda: _async(ttfts == [("m0", "a", ("r0",))]))

        # Mitosis moves the prefill instance a to a new macro instance: m0's cycle goes on with b.
        await leader.move_instance("a", "m1")
        assert await redis_client.lrange(keys.macro_members(prefix, "m0"), 0, -1) == [b"b", b"c"]
        assert await redis_client.lrange(keys.macro_members(prefix, "m1"), 0, -1) == [b"a"]
        status = (await admin(nats_client, prefix, "status")).result
        by_id = {macro["macro_instance_id"]: macro for macro in status["macro_instances"]}
        assert by_id["m0"]["members"] == ["b", "c"] and by_id["m0"]["active"] is None
        assert by_id["m1"]["members"] == ["a"] and by_id["m1"]["rolling_order"] == ["a"]
        assert (await send(nats_client, prefix, "r1")).instance_id == "b"
        assert activations[-1] == ("m0", "b", None, 2)
        # a still has its m0 window open; m1 continues above its epoch and closes it (nothing active there).
        await m["a"].report_window()
        await eventually(lambda: _async(not m["a"].window_open))
        assert m["a"].orders()[-1] == (False, 1)
        # Submits naming m1 reach it; the overall scheduler picks the macro instance of those that name none.
        request = make_submit("r2", "router.x.tokens", PROMPT)
        answer = await nats_client.request(subjects.submit(prefix, "m1"), encode(request), timeout=5)
        named = decode(answer.data)
        assert isinstance(named, SubmitAck) and named.instance_id == "a"
        leader.choose_macro = lambda: "m1"
        assert (await send(nats_client, prefix, "r3")).instance_id == "a"
        assert leader.ttft_budget_left("m1") == pytest.approx(1.0 - 0.8, abs=0.01)
        assert leader.ttft_budget_left("m9") is None


async def test_a_waiting_request_follows_a_switch_to_least_loaded(
    padg_config, nats_client: NATS, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    async with running(padg_config()):
        m = await start_members(nats_client, prefix, "a", "b")
        for i in range(4):
            assert isinstance(await send(nats_client, prefix, f"r{i}"), SubmitAck)
        waiting = asyncio.create_task(send(nats_client, prefix, "r4"))
        await eventually(lambda: _pending(nats_client, prefix, 1))
        reason = (await macro_state(nats_client, prefix))["pending_reason"]
        assert reason is not None and all("ttft_budget" in line for line in reason), reason
        assert (await admin(nats_client, prefix, "config-set", dispatch_policy="least_loaded")).ok
        ack = await asyncio.wait_for(waiting, 5)
        assert isinstance(ack, SubmitAck) and ack.request_id == "r4"
        assert "r4" in [d.request_id for d in m[ack.instance_id].dispatched]


async def test_outside_padg_a_closed_window_is_opened(
    padg_config, nats_client: NATS, ecoserve_prefix: str
) -> None:
    async with running(padg_config(dispatch_policy="least_loaded")):
        instance = PadgInstance(nats_client, ecoserve_prefix, "a")
        await instance.start()
        instance.window_epoch = 6  # left over from an earlier PaDG run
        await instance.report_window()
        # Nobody rolls windows under least_loaded: a padg-policy instance would hold its prompts for ever.
        await eventually(lambda: _async(instance.window_open))
        assert instance.orders() == [(True, 7)]
        assert (await send(nats_client, ecoserve_prefix, "r0")).instance_id == "a"
