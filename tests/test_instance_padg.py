"""The instance side of PaDG over real NATS with a tiny model: PrefillWindow control, output holding, and
the start-up prefill profile. The test plays the coordinator and the router."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable

import msgpack
import nats.errors
import pytest
from instance_support import (
    ENDLESS,
    GREEDY,
    INSTANCE,
    PROMPTS,
    Peer,
    assert_well_formed,
    collect,
    make_engine,
    next_message,
    reference_tokens,
    registered,
    token_ids,
    wait_status,
)
from nats.aio.subscription import Subscription

from services.instance.engine.async_engine import AsyncEngine
from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import LLMEngine
from services.instance.models.loader import load_model
from services.instance.startup_profile import profile_lengths
from shared import subjects
from shared.config import InstanceConfig
from shared.messages import (
    AbortRequest,
    AdminReply,
    DispatchAck,
    ErrorReply,
    InstanceStatus,
    TokenChunk,
)
from shared.prefill_profile import PrefillProfile
from shared.wire import encode

HOLD_CHECK = 0.3  # seconds without a chunk that count as "held"


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(tiny_models["llama"], dtype="float32", attn_implementation=ATTENTION_NAME)


def padg(model) -> AsyncEngine:
    return AsyncEngine(make_engine(model, policy="padg"))


class Throttle:
    """Slows each engine step a little (so a hold collects several steps), and can stall the engine inside
    a step until released."""

    def __init__(self, engine: LLMEngine, step_seconds: float = 0.003):
        self.open = threading.Event()
        self.open.set()
        self.stalled = threading.Event()
        inner = engine.runner.execute

        def execute(plan):
            time.sleep(step_seconds)
            if not self.open.is_set():
                self.stalled.set()
                if not self.open.wait(timeout=20):
                    raise RuntimeError("the test never released the stalled engine")
                self.stalled.clear()
            return inner(plan)

        engine.runner.execute = execute


async def assert_silent(sub: Subscription, seconds: float = HOLD_CHECK) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        chunk = await next_message(sub, seconds)
        pytest.fail(f"expected nothing, got {chunk}")


async def abort(peer: Peer, *request_ids: str) -> None:
    await peer.nc.publish(
        subjects.instance_abort(peer.prefix, INSTANCE),
        encode(AbortRequest(request_ids=list(request_ids), reason="test")),
    )


async def fresh_status(sub: Subscription, predicate: Callable[[InstanceStatus], object]) -> InstanceStatus:
    """The first report stamped from now on that satisfies `predicate` (older ones may still be queued)."""
    since = time.time()
    return await wait_status(sub, lambda s: s.time >= since and predicate(s))


def assert_prefix_of_reference(model, prompt: list[int], chunks: list[TokenChunk]) -> None:
    got = token_ids(chunks)
    assert got, "no tokens"
    want = reference_tokens(model, {"r": prompt}, {**ENDLESS, "max_tokens": len(got)})["r"]
    assert got == want


async def test_a_closed_window_holds_prompts_until_a_prefill_window_opens(
    model, nats_server, nats_client, ecoserve_prefix
):
    prompts = {str(i): p for i, p in enumerate(PROMPTS)}
    expected = reference_tokens(model, prompts, GREEDY)
    options = {"engine": padg(model), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (_, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        closed = await fresh_status(statuses, lambda s: True)
        assert (closed.prefill_window, closed.window_epoch) == (False, 0)
        for request_id, prompt in prompts.items():
            assert isinstance(await peer.dispatch(request_id, prompt, GREEDY), DispatchAck)
        await assert_silent(tokens)
        waiting = await fresh_status(statuses, lambda s: s.num_waiting == 3)
        assert waiting.num_running == 0 and waiting.prefill_window is False

        reply = await peer.window(True, 1)
        assert isinstance(reply, AdminReply) and reply.ok, reply
        assert reply.result["applied"] and reply.result["changed"] and not reply.result["stale"]
        assert (reply.result["prefill_window"], reply.result["window_epoch"]) == (True, 1)
        assert reply.result["instance_id"] == INSTANCE
        chunks = await collect(tokens, set(prompts))
        for request_id, want in expected.items():
            assert_well_formed(chunks[request_id])
            assert token_ids(chunks[request_id]) == want
        opened = await fresh_status(statuses, lambda s: s.num_running == 0)
        assert (opened.prefill_window, opened.window_epoch) == (True, 1)


async def test_epochs_only_move_forward(model, nats_server, nats_client, ecoserve_prefix):
    options = {"engine": padg(model), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (_, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        assert (await peer.window(True, 5)).ok
        stale = await peer.window(False, 4)
        assert isinstance(stale, AdminReply) and stale.ok, "a stale message is answered, not an error"
        assert stale.result["stale"] and not stale.result["applied"]
        assert (stale.result["prefill_window"], stale.result["window_epoch"]) == (True, 5)
        # Still open: a new prompt is prefilled.
        assert isinstance(await peer.dispatch("a", PROMPTS[0], GREEDY), DispatchAck)
        assert_well_formed((await collect(tokens, {"a"}))["a"])
        status = await fresh_status(statuses, lambda s: True)
        assert (status.prefill_window, status.window_epoch) == (True, 5)

        closed = await peer.window(False, 6)
        assert closed.ok and closed.result["changed"] and closed.result["prefill_window"] is False
        again = await peer.window(False, 6)  # a retry of the same epoch: applied, changes nothing
        assert again.ok and again.result["applied"] and not again.result["changed"]
        await asyncio.sleep(0.2)  # past the policy's grace for prompts that raced the close
        assert isinstance(await peer.dispatch("b", PROMPTS[1], GREEDY), DispatchAck)
        await assert_silent(tokens)
        status = await fresh_status(statuses, lambda s: s.num_waiting == 1)
        assert (status.prefill_window, status.window_epoch) == (False, 6)
        assert (await peer.window(True, 7)).ok
        assert len(token_ids((await collect(tokens, {"b"}))["b"])) == GREEDY["max_tokens"]


async def test_an_instance_without_the_padg_policy_refuses_windows(
    model, nats_server, nats_client, ecoserve_prefix
):
    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (_, peer):
        statuses = await peer.statuses()
        reply = await peer.window(True, 1)
        assert isinstance(reply, AdminReply) and not reply.ok
        assert "sarathi" in (reply.error or "") and "padg" in (reply.error or "")
        status = await fresh_status(statuses, lambda s: True)
        assert (status.prefill_window, status.window_epoch) == (None, 0)
        assert peer.registrations[0].info.prefill_profile is None, "auto profiles padg instances only"


async def test_malformed_windows_are_answered_with_the_field(
    model, nats_server, nats_client, ecoserve_prefix
):
    options = {"engine": padg(model), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (_, peer):
        statuses = await peer.statuses()
        control = subjects.instance_control(ecoserve_prefix, INSTANCE)
        good = {"v": 1, "type": "PrefillWindow", "active": True, "epoch": 1, "time": 0.0, "ttft_slo": 1.0}
        for change, field in [
            ({"active": "yes"}, "active"),
            ({"epoch": 1.5}, "epoch"),
            ({"ttft_slo": None}, "ttft_slo"),
            ({"hold_outputs": 1}, "hold_outputs"),
        ]:
            reply = await peer.request(control, msgpack.packb(good | change))
            assert isinstance(reply, ErrorReply) and reply.code == "bad_message", reply
            assert reply.field == field
        missing = {k: v for k, v in good.items() if k != "epoch"}
        reply = await peer.request(control, msgpack.packb(missing))
        assert isinstance(reply, ErrorReply) and (reply.code, reply.field) == ("bad_message", "epoch")
        negative = await peer.window(True, 1, ttft_slo=-1.0, hold_outputs=True)
        assert isinstance(negative, ErrorReply) and (negative.code, negative.field) == (
            "bad_request",
            "ttft_slo",
        )
        status = await fresh_status(statuses, lambda s: True)
        assert (status.prefill_window, status.window_epoch) == (False, 0), "nothing was applied"


async def test_held_tokens_are_released_at_the_deadline_even_without_a_step(
    model, nats_server, nats_client, ecoserve_prefix
):
    core = make_engine(model, policy="padg")
    throttle = Throttle(core)
    options = {"engine": AsyncEngine(core), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (_, peer):
        tokens = await peer.tokens()
        sent = time.monotonic()  # the engine's clock (AsyncEngine's default) in this test
        assert (await peer.window(True, 1, ttft_slo=1.0, hold_outputs=True)).ok
        assert isinstance(await peer.dispatch("a", PROMPTS[2], ENDLESS), DispatchAck)
        await assert_silent(tokens)
        throttle.open.clear()  # the engine stops inside its next step: only the timer can release now
        while not throttle.stalled.is_set():
            await asyncio.sleep(0.005)
        first = await next_message(tokens, 10)
        assert throttle.stalled.is_set(), "released while the engine was stalled"
        assert time.monotonic() - sent >= 1.0, "not before the deadline"
        assert first.seq == 0 and not first.finished and len(first.token_ids) > 1
        assert first.completion_tokens == len(first.token_ids)
        throttle.open.set()
        # Past the deadline, with the window still open, tokens stream step by step again.
        following = [await next_message(tokens) for _ in range(3)]
        assert [(c.seq, len(c.token_ids)) for c in following] == [(1, 1), (2, 1), (3, 1)]
        await abort(peer, "a")
        chunks = [first, *following, *(await collect(tokens, {"a"}))["a"]]
        assert_well_formed(chunks)
        assert chunks[-1].finish_reason == "abort"
        assert_prefix_of_reference(model, PROMPTS[2], chunks)


async def test_closing_the_window_releases_held_tokens_and_finished_requests_go_at_once(
    model, nats_server, nats_client, ecoserve_prefix
):
    core = make_engine(model, policy="padg")
    Throttle(core)
    options = {"engine": AsyncEngine(core), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (_, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        reply = await peer.window(True, 1, ttft_slo=60.0, hold_outputs=True)
        assert reply.ok
        assert isinstance(await peer.dispatch("long", PROMPTS[2], ENDLESS), DispatchAck)
        assert isinstance(await peer.dispatch("short", PROMPTS[1], GREEDY), DispatchAck)
        # "short" finishes while "long" still runs: all its tokens at once, in one terminal chunk.
        (short,) = (await collect(tokens, {"short"}))["short"]
        assert (short.seq, short.finished, short.finish_reason) == (0, True, "length")
        assert short.token_ids == reference_tokens(model, {"s": PROMPTS[1]}, GREEDY)["s"]
        await assert_silent(tokens)  # "long" is held
        held = await fresh_status(statuses, lambda s: s.requests and s.requests[0].output_tokens > 2)
        assert held.prefill_window is True and held.window_epoch == 1

        assert (await peer.window(False, 2)).ok
        first = await next_message(tokens, 10)
        assert first.request_id == "long" and first.seq == 0 and len(first.token_ids) > 2
        second = await next_message(tokens, 10)
        assert second.seq == 1 and len(second.token_ids) == 1, "no hold once the window closed"
        await abort(peer, "long")
        chunks = [first, second, *(await collect(tokens, {"long"}))["long"]]
        assert_well_formed(chunks)
        assert_prefix_of_reference(model, PROMPTS[2], chunks)


async def test_an_aborted_request_loses_its_held_tokens_and_frees_its_blocks(
    model, nats_server, nats_client, ecoserve_prefix
):
    core = make_engine(model, policy="padg")
    Throttle(core)
    options = {"engine": AsyncEngine(core), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (_, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        assert (await peer.window(True, 1, ttft_slo=60.0, hold_outputs=True)).ok
        assert isinstance(await peer.dispatch("x", PROMPTS[2], ENDLESS), DispatchAck)
        await fresh_status(statuses, lambda s: s.requests and s.requests[0].output_tokens > 2)
        await abort(peer, "x")
        (only,) = (await collect(tokens, {"x"}))["x"]
        assert (only.seq, only.token_ids, only.finish_reason) == (0, [], "abort")
        assert only.completion_tokens == 0, "held tokens were never published"
        freed = await fresh_status(statuses, lambda s: s.num_running == 0)
        assert freed.kv_blocks_free == freed.kv_blocks_total and freed.requests == []
        await assert_silent(tokens)


async def test_registration_carries_the_prefill_profile_cached_across_restarts(
    model, nats_server, nats_client, ecoserve_prefix, tmp_path
):
    options = {"engine": padg(model), "profile_cache_dir": tmp_path}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **options) as (service, peer):
        info = peer.registrations[0].info
        assert info.policy == "padg" and info.prefill_profile is not None
        profile = PrefillProfile.from_dict(info.prefill_profile)
        lengths = [n for n, _ in profile.points]
        assert lengths == profile_lengths(info.max_model_len) == [16, 32, 64, 128, 256, 512]
        assert all(seconds > 0 for _, seconds in profile.points)
        assert (profile.kv_blocks_total, profile.block_size) == (info.kv_blocks_total, info.block_size)
        stats = service.engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == stats.num_waiting == 0
        # The profile's requests left nothing behind: a request still runs normally.
        tokens = await peer.tokens()
        assert (await peer.window(True, 1)).ok
        assert isinstance(await peer.dispatch("r", PROMPTS[0], GREEDY), DispatchAck)
        assert_well_formed((await collect(tokens, {"r"}))["r"])
    assert len(list(tmp_path.glob("*.json"))) == 1

    # A restart with the same model and settings announces the cached profile at once.
    again = {"engine": padg(model), "profile_cache_dir": tmp_path}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **again) as (_, peer):
        assert peer.registrations[0].info.prefill_profile == info.prefill_profile


async def test_profile_prefill_on_profiles_any_policy_and_off_none(
    model, nats_server, nats_client, ecoserve_prefix
):
    async with registered(model, nats_server, nats_client, ecoserve_prefix, profile_prefill="on") as (
        _,
        peer,
    ):
        info = peer.registrations[0].info
        assert info.policy == "sarathi"
        assert PrefillProfile.from_dict(info.prefill_profile).points
    off = {"engine": padg(model), "profile_prefill": "off"}
    async with registered(model, nats_server, nats_client, ecoserve_prefix, **off) as (_, peer):
        assert peer.registrations[0].info.prefill_profile is None


def test_the_profile_setting_is_checked_and_read_from_the_environment():
    with pytest.raises(ValueError, match="profile_prefill"):
        InstanceConfig(profile_prefill="sometimes")
    parser = argparse.ArgumentParser()
    InstanceConfig.add_arguments(parser, environ={"ECOSERVE_PROFILE_PREFILL": "on"})
    assert InstanceConfig.from_args(parser.parse_args([])).profile_prefill == "on"
    assert InstanceConfig.from_args(parser.parse_args(["--profile-prefill", "off"])).profile_prefill == "off"
    assert InstanceConfig().profile_prefill == "auto"
