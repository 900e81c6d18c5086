"""The asyncio interface: streams per request, aborts, engine-thread calls, a responsive event loop, and a
crashed engine that fails its streams instead of hanging them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.instance.engine.async_engine import AsyncEngine, EngineDeadError
from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.models.loader import load_model

PROMPTS = [[5, 17, 300, 41, 9, 77], [400, 12, 13, 14], list(range(100, 140))]


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(tiny_models["qwen2"], dtype="float32", attn_implementation=ATTENTION_NAME)


def engine_of(model, **config) -> LLMEngine:
    return LLMEngine(model, eos_token_ids_of(model), EngineConfig(**config))


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def sync_tokens(model, prompts) -> list[list[int]]:
    engine = engine_of(model)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy())
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))]


async def collect(stream) -> tuple[list[int], list]:
    outs = [out async for out in stream]
    return [t for o in outs for t in o.new_token_ids], outs


async def test_streams_match_the_synchronous_engine(model):
    expected = sync_tokens(model, PROMPTS)
    engine = AsyncEngine(engine_of(model))
    engine.start()
    try:
        streams = [engine.add_request(str(i), p, greedy()) for i, p in enumerate(PROMPTS)]
        results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 60)
        for (toks, outs), want in zip(results, expected, strict=True):
            assert toks == want
            assert outs[-1].finished and outs[-1].finish_reason == "length"
        stats = engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total and engine.num_open_streams == 0
    finally:
        await engine.shutdown()


async def test_bad_requests_raise_in_the_caller(model):
    engine = AsyncEngine(engine_of(model))
    engine.start()
    try:
        with pytest.raises(ParameterError) as info:
            engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=0))
        assert info.value.field == "max_tokens"
        with pytest.raises(ParameterError):
            engine.add_request("b", [], SamplingParams())
        engine.add_request("c", PROMPTS[0], greedy(2))
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("c", PROMPTS[0], greedy(2))
    finally:
        await engine.shutdown()


async def test_abort_ends_the_stream_and_frees_blocks(model):
    engine = AsyncEngine(engine_of(model))
    engine.start()
    try:
        stream = engine.add_request("long", PROMPTS[2], SamplingParams(max_tokens=10_000, ignore_eos=True))
        other = engine.add_request("short", PROMPTS[0], greedy(4))
        first = await asyncio.wait_for(stream.__anext__(), 30)
        assert first.new_token_ids
        engine.abort("long")
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        await asyncio.wait_for(collect(other), 30)
        stats = await engine.call(lambda e: e.stats())  # runs after the abort was applied
        assert stats.num_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    finally:
        await engine.shutdown()


async def test_the_event_loop_runs_while_the_engine_computes(model):
    """The engine thread pauses inside a step until the event loop answers: a blocked loop would hang."""
    engine = AsyncEngine(engine_of(model))
    in_step, loop_answered = threading.Event(), threading.Event()
    inner = engine.engine.runner.execute

    def execute(plan):
        in_step.set()
        if not loop_answered.wait(timeout=20):
            raise RuntimeError("event loop did not run during a step")
        return inner(plan)

    engine.engine.runner.execute = execute
    engine.start()
    try:
        stream = engine.add_request("a", PROMPTS[2], greedy(3))
        while not in_step.is_set():
            await asyncio.sleep(0.005)
        loop_answered.set()  # this line runs on the loop while the engine thread is mid-step
        toks, _ = await asyncio.wait_for(collect(stream), 30)
        assert len(toks) == 3
    finally:
        await engine.shutdown()


async def test_engine_calls_run_in_the_engine_thread(model):
    engine = AsyncEngine(engine_of(model))
    engine.start()
    try:
        name = await engine.call(lambda e: threading.current_thread().name)
        assert name == "ecoserve-engine"
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda e: 1 / 0)
    finally:
        await engine.shutdown()


async def test_a_crashed_engine_fails_its_streams(model):
    engine = AsyncEngine(engine_of(model))

    def explode(plan):
        raise RuntimeError("simulated device failure")

    engine.engine.runner.execute = explode
    engine.start()
    try:
        stream = engine.add_request("a", PROMPTS[0], greedy())
        with pytest.raises(EngineDeadError, match="simulated device failure"):
            await asyncio.wait_for(stream.__anext__(), 30)
        with pytest.raises(EngineDeadError):
            engine.add_request("b", PROMPTS[0], greedy())
    finally:
        await engine.shutdown()


async def test_shutdown_fails_open_streams(model):
    engine = AsyncEngine(engine_of(model))
    engine.start()
    stream = engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=100_000, ignore_eos=True))
    await asyncio.wait_for(stream.__anext__(), 30)
    await engine.shutdown()
    with pytest.raises(EngineDeadError):
        async for _ in stream:
            pass


async def test_a_policy_holding_requests_back_does_not_spin_the_engine_thread(model):
    from services.instance.engine.policies import SarathiPolicy
    from services.instance.engine.scheduler import SchedulerOutput

    class HoldEverything:
        name = "hold"
        calls = 0

        def schedule(self, scheduler, now):
            HoldEverything.calls += 1
            return SchedulerOutput()

    engine = AsyncEngine(engine_of(model))
    engine.engine.scheduler.policy = HoldEverything()
    engine.start()
    try:
        stream = engine.add_request("a", PROMPTS[0], greedy(3))
        await asyncio.sleep(0.5)
        assert HoldEverything.calls < 40, f"{HoldEverything.calls} empty steps in 0.5 s: the thread spins"

        def release(e: LLMEngine) -> None:
            e.scheduler.policy = SarathiPolicy()

        await engine.call(release)
        toks, _ = await asyncio.wait_for(collect(stream), 30)
        assert len(toks) == 3
    finally:
        await engine.shutdown()


async def test_submitted_requests_reach_only_the_step_listeners(model):
    expected = sync_tokens(model, PROMPTS)
    engine = AsyncEngine(engine_of(model))
    got: dict[str, list[int]] = {}
    finished: set[str] = set()
    done = asyncio.Event()

    def on_step(outputs, stats) -> None:
        for out in outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        if len(finished) == len(PROMPTS):
            done.set()

    engine.add_step_listener(on_step)
    engine.start()
    try:
        for i, p in enumerate(PROMPTS):
            assert engine.submit(str(i), p, greedy()) is None
        with pytest.raises(ParameterError):
            engine.submit("bad", PROMPTS[0], SamplingParams(max_tokens=0))
        await asyncio.wait_for(done.wait(), 60)
        assert [got[str(i)] for i in range(len(PROMPTS))] == expected
        assert engine.num_open_streams == 0
    finally:
        await engine.shutdown()


async def test_death_listeners_hear_once_of_a_crash_and_of_a_shutdown(model):
    crashing = AsyncEngine(engine_of(model))

    def explode(plan):
        raise RuntimeError("simulated device failure")

    crashing.engine.runner.execute = explode
    heard: list[tuple[str, bool]] = []
    crashing.add_death_listener(lambda error: heard.append((str(error), crashing.crashed)))
    crashing.start()
    crashing.submit("a", PROMPTS[0], greedy())
    for _ in range(200):
        if heard:
            break
        await asyncio.sleep(0.01)
    await crashing.shutdown()
    assert len(heard) == 1 and "simulated device failure" in heard[0][0] and heard[0][1]

    stopped = AsyncEngine(engine_of(model))
    heard.clear()
    stopped.add_death_listener(lambda error: heard.append((str(error), stopped.crashed)))
    stopped.start()
    await stopped.shutdown()
    assert heard == [("engine shut down", False)]


async def test_a_call_the_engine_never_ran_fails_at_shutdown(model):
    engine = AsyncEngine(engine_of(model))
    in_step, release = threading.Event(), threading.Event()
    inner = engine.engine.runner.execute

    def execute(plan):
        in_step.set()
        release.wait(timeout=20)
        return inner(plan)

    engine.engine.runner.execute = execute
    engine.start()
    engine.submit("a", PROMPTS[0], greedy(100))
    while not in_step.is_set():
        await asyncio.sleep(0.005)
    pending = asyncio.ensure_future(engine.call(lambda e: "ran"))
    await asyncio.sleep(0)  # queued behind the step under way
    stopping = asyncio.ensure_future(engine.shutdown())
    await asyncio.sleep(0.05)
    release.set()  # the thread finishes its step and stops without running the call
    await asyncio.wait_for(stopping, 30)
    with pytest.raises(EngineDeadError, match="shut down"):
        await asyncio.wait_for(pending, 5)
