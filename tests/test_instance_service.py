"""The instance service over real NATS with a tiny model; the test plays the coordinator and the router."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    registered,
    running,
    token_ids,
    wait_status,
)

from services.instance.engine.async_engine import AsyncEngine
from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.sampling_params import SamplingParams
from services.instance.models.loader import load_model
from services.instance.status import phase_of
from shared import subjects
from shared.messages import (
    AbortRequest,
    AdminReply,
    DeregisterInstance,
    DispatchAck,
    ErrorReply,
    InstanceStatus,
)
from shared.wire import encode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(tiny_models["llama"], dtype="float32", attn_implementation=ATTENTION_NAME)


async def test_greedy_streams_equal_the_engine_alone(model, nats_server, nats_client, ecoserve_prefix):
    reference = make_engine(model)
    for i, prompt in enumerate(PROMPTS):
        reference.add_request(str(i), prompt, SamplingParams(**GREEDY))
    expected: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while reference.has_unfinished_requests():
        for out in reference.step():
            expected[out.request_id].extend(out.new_token_ids)

    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (service, peer):
        info = peer.registrations[0].info
        assert (info.instance_id, info.model, info.kv_blocks_total) == (INSTANCE, "tiny", 64)
        assert info.subjects.requests == subjects.instance_requests(ecoserve_prefix, INSTANCE)
        assert service.macro_instance_id == "m0"
        tokens, statuses = await peer.tokens(), await peer.statuses()
        started = time.time()
        for i, prompt in enumerate(PROMPTS):
            sampling = {**GREEDY, "logprobs": 2} if i == 1 else GREEDY
            ack = await peer.dispatch(str(i), prompt, sampling)
            assert ack == DispatchAck(request_id=str(i), instance_id=INSTANCE, accepted=True)
        chunks = await collect(tokens, set(expected))

        for rid, want in expected.items():
            got = chunks[rid]
            assert_well_formed(got)
            assert token_ids(got) == want
            last = got[-1]
            assert (last.finish_reason, last.prompt_tokens) == ("length", len(PROMPTS[int(rid)]))
            assert [c.completion_tokens for c in got] == list(range(1, len(want) + 1))
            assert last.queue_time is not None and last.queue_time >= 0
            # Engine times (monotonic here) are reported as unix seconds.
            assert last.first_token_time is not None and started <= last.first_token_time <= time.time()
        with_logprobs = chunks["1"]
        for chunk in with_logprobs:
            assert chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.token_ids)
            (lp,) = chunk.logprobs
            assert lp.token_id == chunk.token_ids[0] and lp.rank == 1 and len(lp.top_ids) == 2
        assert chunks["0"][0].logprobs is None

        # The reports follow the work: each request listed while held, then nothing held, every block free.
        listed: set[str] = set()

        def all_done(status: InstanceStatus) -> bool:
            listed.update(p.request_id for p in status.requests)
            return listed == set(expected) and not status.requests and status.num_running == 0

        idle = await wait_status(statuses, all_done)
        assert idle.state == "ready" and idle.phase == "idle"
        assert idle.kv_blocks_free == idle.kv_blocks_total == 64


async def test_steps_report_progress_and_phase(model, nats_server, nats_client, ecoserve_prefix):
    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (_, peer):
        statuses = await peer.statuses()
        assert isinstance(await peer.dispatch("p", PROMPTS[2], {**GREEDY, "max_tokens": 200}), DispatchAck)
        decoding = await wait_status(
            statuses, lambda s: s.phase == "decode" and s.requests and s.requests[0].output_tokens > 1
        )
        (progress,) = decoding.requests
        assert (progress.request_id, progress.prompt_tokens) == ("p", len(PROMPTS[2]))
        assert progress.first_token_time is not None and progress.arrival_time <= progress.first_token_time
        assert decoding.num_running == 1 and decoding.kv_blocks_free < decoding.kv_blocks_total


async def test_bad_requests_are_answered_with_the_field(model, nats_server, nats_client, ecoserve_prefix):
    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (_, peer):
        tokens = await peer.tokens()
        cases = [
            ({"sampling": {"max_tokens": 0}}, "max_tokens"),
            ({"sampling": {"temperature": "hot"}}, "temperature"),
            ({"sampling": {"top_p": 1.5}}, "top_p"),
            ({"sampling": {"best_of": 2}}, "best_of"),
            ({"prompt_token_ids": []}, "prompt"),
            ({"prompt_token_ids": [1, 10**9]}, "prompt_token_ids"),
            ({"reply_subject": "not a subject"}, "reply_subject"),
            ({"instance_id": "someone-else"}, "instance_id"),
        ]
        for change, field in cases:
            reply = await peer.dispatch("bad", PROMPTS[0], GREEDY, **change)
            assert isinstance(reply, ErrorReply), change
            assert (reply.code, reply.field) == ("bad_request", field), reply

        assert isinstance(await peer.dispatch("dup", PROMPTS[0], ENDLESS), DispatchAck)
        duplicate = await peer.dispatch("dup", PROMPTS[1], GREEDY)
        assert isinstance(duplicate, ErrorReply)
        assert (duplicate.code, duplicate.field) == ("bad_request", "request_id")
        await peer.nc.publish(
            subjects.instance_abort(ecoserve_prefix, INSTANCE),
            encode(AbortRequest(request_ids=["dup"], reason="test")),
        )
        chunks = await collect(tokens, {"dup"})
        assert chunks["dup"][-1].finish_reason == "abort"


async def test_malformed_messages_are_answered_or_dropped(model, nats_server, nats_client, ecoserve_prefix):
    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (_, peer):
        requests = subjects.instance_requests(ecoserve_prefix, INSTANCE)
        control = subjects.instance_control(ecoserve_prefix, INSTANCE)
        abort = subjects.instance_abort(ecoserve_prefix, INSTANCE)
        missing_sampling = msgpack.packb(
            {"v": 1, "type": "DispatchRequest", "request_id": "x", "model": "tiny", "prompt_token_ids": [1]}
        )
        for subject, payload, field in [
            (requests, b"\xc1 not msgpack", None),
            (requests, encode(AbortRequest(request_ids=["x"], reason="wrong type")), None),
            (requests, missing_sampling, "sampling"),
            (control, b"\x93\x01\x02", None),
            (control, msgpack.packb({"v": 1, "type": "InstanceControl", "command": "explode"}), "command"),
        ]:
            reply = await peer.request(subject, payload)
            assert isinstance(reply, ErrorReply) and reply.code == "bad_message", reply
            assert reply.field == field
        # Publish-only subjects: dropped without an answer, and nothing breaks.
        for payload in (
            b"\xff\x00garbage",
            msgpack.packb({"v": 1, "type": "AbortRequest", "request_ids": 5}),
        ):
            await peer.nc.publish(abort, payload)
        await peer.nc.publish(subjects.status(ecoserve_prefix, INSTANCE), b"not a status")

        tokens = await peer.tokens()
        assert isinstance(await peer.dispatch("after", PROMPTS[0], GREEDY), DispatchAck)
        chunks = await collect(tokens, {"after"})
        assert_well_formed(chunks["after"])
        assert len(token_ids(chunks["after"])) == GREEDY["max_tokens"]


async def test_abort_mid_stream_frees_every_block(model, nats_server, nats_client, ecoserve_prefix):
    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (_, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        assert isinstance(await peer.dispatch("long", PROMPTS[2], ENDLESS), DispatchAck)
        first = await next_message(tokens)
        assert first.request_id == "long" and first.seq == 0 and not first.finished
        await wait_status(statuses, lambda s: s.kv_blocks_free < s.kv_blocks_total)
        await peer.nc.publish(
            subjects.instance_abort(ecoserve_prefix, INSTANCE),
            encode(AbortRequest(request_ids=["never-seen", "long"], reason="client gone")),
        )
        rest = (await collect(tokens, {"long"}))["long"]
        assert_well_formed([first, *rest])
        assert rest[-1].finish_reason == "abort" and rest[-1].prompt_tokens == len(PROMPTS[2])
        freed = await wait_status(
            statuses, lambda s: s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0
        )
        assert freed.requests == [] and freed.num_waiting == 0 and freed.phase == "idle"


async def test_heartbeats_flow_during_a_long_step(model, nats_server, nats_client, ecoserve_prefix):
    """The engine blocks inside its step until the test has seen heartbeats: a stalled event loop hangs."""
    engine = AsyncEngine(make_engine(model))
    in_step, release = threading.Event(), threading.Event()
    inner = engine.engine.runner.execute

    def execute(plan):
        in_step.set()
        if not release.wait(timeout=20):
            raise RuntimeError("the test never saw heartbeats during the step")
        return inner(plan)

    engine.engine.runner.execute = execute
    async with registered(model, nats_server, nats_client, ecoserve_prefix, engine=engine) as (_, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        assert isinstance(await peer.dispatch("slow", PROMPTS[2], {**GREEDY, "max_tokens": 3}), DispatchAck)
        while not in_step.is_set():
            await asyncio.sleep(0.005)
        step_began = time.time()
        # Only reports stamped after the step began count: older ones may still sit in the queue.
        during = [await wait_status(statuses, lambda s: s.time > step_began, 10) for _ in range(3)]
        release.set()
        assert during[0].seq < during[1].seq < during[2].seq
        assert during[0].time < during[1].time < during[2].time
        assert all(s.requests and s.requests[0].request_id == "slow" for s in during)
        chunks = await collect(tokens, {"slow"})
        assert len(token_ids(chunks["slow"])) == 3


async def test_registration_retries_until_a_coordinator_accepts(
    model, nats_server, nats_client, ecoserve_prefix
):
    peer = Peer(nats_client, ecoserve_prefix)
    statuses = await peer.statuses()
    async with running(model, nats_server, ecoserve_prefix) as service:
        # Nobody answers yet: the instance heartbeats as "starting" and keeps trying.
        early = await wait_status(statuses, lambda s: True)
        assert early.state == "starting"
        await asyncio.sleep(0.3)  # several attempts against no responder
        assert not service.registered.is_set()
        await peer.answer_registrations(refuse_first=1, macro="m7")
        await asyncio.wait_for(service.registered.wait(), 10)
        assert len(peer.registrations) == 2 and service.macro_instance_id == "m7"
        await wait_status(statuses, lambda s: s.state == "ready")

        # "register": the coordinator lost us and asks again.
        reply = await peer.control("register")
        assert isinstance(reply, AdminReply) and reply.ok
        for _ in range(100):
            if len(peer.registrations) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(peer.registrations) == 3


async def test_drain_rejects_new_work_and_finishes_held_work(
    model, nats_server, nats_client, ecoserve_prefix
):
    async with registered(model, nats_server, nats_client, ecoserve_prefix) as (service, peer):
        tokens, statuses = await peer.tokens(), await peer.statuses()
        held = {**GREEDY, "max_tokens": 40}
        assert isinstance(await peer.dispatch("held", PROMPTS[0], held), DispatchAck)
        reply = await peer.control("drain")
        assert isinstance(reply, AdminReply) and reply.ok and reply.result["state"] == "draining"
        rejected = await peer.dispatch("new", PROMPTS[1], GREEDY)
        assert isinstance(rejected, ErrorReply) and rejected.code == "unavailable"
        assert rejected.retry_after is not None and rejected.retry_after > 0
        await wait_status(statuses, lambda s: s.state == "draining")
        chunks = await collect(tokens, {"held"})
        assert_well_formed(chunks["held"])
        assert len(token_ids(chunks["held"])) == 40 and chunks["held"][-1].finish_reason == "length"

        resumed = await peer.control("resume")
        assert isinstance(resumed, AdminReply) and resumed.ok and service.state == "ready"
        assert isinstance(await peer.dispatch("new", PROMPTS[1], GREEDY), DispatchAck)
        await collect(tokens, {"new"})


async def test_shutdown_command_fails_what_is_left_and_deregisters(
    model, nats_server, nats_client, ecoserve_prefix
):
    peer = Peer(nats_client, ecoserve_prefix)
    await peer.answer_registrations()
    gone = await peer.subscribe(subjects.deregister(ecoserve_prefix))
    async with running(model, nats_server, ecoserve_prefix, drain_timeout=0.2) as service:
        await asyncio.wait_for(service.registered.wait(), 10)
        tokens = await peer.tokens()
        assert isinstance(await peer.dispatch("long", PROMPTS[2], ENDLESS), DispatchAck)
        await next_message(tokens)
        reply = await peer.control("shutdown")
        assert isinstance(reply, AdminReply) and reply.ok
        rest = (await collect(tokens, {"long"}))["long"]
        assert rest[-1].finish_reason == "error" and "shut down" in (rest[-1].error or "")
        assert await next_message(gone) == DeregisterInstance(instance_id=INSTANCE, reason="shutdown command")
        await asyncio.wait_for(service.wait_stopped(), 10)
        assert service.exit_code == 0 and not service.engine.is_running
        with pytest.raises(nats.errors.NoRespondersError):
            await peer.dispatch("late", PROMPTS[0], GREEDY)


async def test_a_dead_engine_ends_streams_with_an_error(model, nats_server, nats_client, ecoserve_prefix):
    engine = AsyncEngine(make_engine(model))

    def explode(plan):
        raise RuntimeError("simulated device failure")

    engine.engine.runner.execute = explode
    gone = await Peer(nats_client, ecoserve_prefix).subscribe(subjects.deregister(ecoserve_prefix))
    async with registered(model, nats_server, nats_client, ecoserve_prefix, engine=engine) as (service, peer):
        tokens = await peer.tokens()
        assert isinstance(await peer.dispatch("doomed", PROMPTS[0], GREEDY), DispatchAck)
        (chunk,) = (await collect(tokens, {"doomed"}))["doomed"]
        assert (chunk.seq, chunk.finished, chunk.finish_reason) == (0, True, "error")
        assert "simulated device failure" in (chunk.error or "")
        assert (await next_message(gone)).reason == "engine died"
        await asyncio.wait_for(service.wait_stopped(), 10)
        assert service.exit_code == 1


async def test_the_process_shuts_down_cleanly_on_sigterm(
    tiny_models, nats_server, nats_client, ecoserve_prefix, tmp_path
):
    peer = Peer(nats_client, ecoserve_prefix, instance_id="proc-1")
    await peer.answer_registrations()
    gone = await peer.subscribe(subjects.deregister(ecoserve_prefix))
    tokens = await peer.tokens()
    log_path = tmp_path / "instance.log"
    command = [
        sys.executable, "-m", "services.instance",
        "--nats-url", nats_server.url, "--prefix", ecoserve_prefix, "--instance-id", "proc-1",
        "--model", str(tiny_models["llama"]), "--dtype", "float32", "--threads", "1",
        "--kv-cache-gb", "0.01", "--heartbeat-interval", "0.2", "--drain-timeout", "0.5",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if peer.registrations or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert peer.registrations, log_path.read_text()
        info = peer.registrations[0].info
        assert (info.instance_id, info.pid, info.model) == ("proc-1", proc.pid, str(tiny_models["llama"]))

        assert isinstance(await peer.dispatch("r", PROMPTS[2], ENDLESS), DispatchAck)
        first = await next_message(tokens, 30)
        assert first.seq == 0 and not first.finished
        proc.send_signal(signal.SIGTERM)
        rest = (await collect(tokens, {"r"}, timeout=30))["r"]
        assert [c.seq for c in rest] == list(range(1, len(rest) + 1))
        assert rest[-1].finish_reason in ("error", "length")
        assert await next_message(gone, 30) == DeregisterInstance(instance_id="proc-1", reason="SIGTERM")
        assert await asyncio.to_thread(proc.wait, 30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_phase_follows_the_engine_last_step(model):
    engine = make_engine(model)
    stats = engine.stats()
    assert (stats.last_step_prefill_tokens, stats.last_step_decode_tokens) == (0, 0)
    assert phase_of(stats) == "idle"
    engine.add_request("a", PROMPTS[2], SamplingParams(**GREEDY))
    engine.step()
    stats = engine.stats()
    assert (stats.last_step_prefill_tokens, stats.last_step_decode_tokens) == (len(PROMPTS[2]), 0)
    assert phase_of(stats) == "prefill"
    engine.step()
    assert phase_of(engine.stats()) == "decode"
    engine.add_request("b", PROMPTS[0], SamplingParams(**GREEDY))
    engine.step()  # sarathi: a's decode and b's prompt in one step
    stats = engine.stats()
    assert (stats.last_step_prefill_tokens, stats.last_step_decode_tokens) == (len(PROMPTS[0]), 1)
    assert phase_of(stats) == "mixed"
    engine.abort_request("a")
    engine.abort_request("b")
    assert phase_of(engine.stats()) == "idle"
