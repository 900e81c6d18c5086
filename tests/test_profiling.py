"""Prefill profiling on a tiny model, and the profile's encoding."""

from __future__ import annotations

import msgpack
import pytest
import torch

from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.policies import PaDGPolicy
from services.instance.engine.profiling import QUICK_LENGTHS, default_lengths, profile_prefill
from services.instance.engine.sampling_params import SamplingParams
from services.instance.models.loader import load_model
from shared.prefill_profile import PrefillProfile


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(tiny_models["llama"], dtype="float32", attn_implementation=ATTENTION_NAME)


def engine_for(model, **config) -> LLMEngine:
    return LLMEngine(model, eos_token_ids_of(model), EngineConfig(**config))


def assert_idle(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.num_running == stats.num_waiting == 0


def test_quick_profile_through_a_padg_engine_with_a_closed_window(model):
    engine = engine_for(model, num_kv_blocks=64, max_num_batched_tokens=32)
    closed = PaDGPolicy()
    engine.scheduler.policy = closed
    profile = profile_prefill(engine, quick=True, repeats=2)
    assert [n for n, _ in profile.points] == list(QUICK_LENGTHS)
    times = [t for _, t in profile.points]
    assert all(t > 0 for t in times)
    assert times[-1] >= 0.5 * times[0], "64 tokens (two steps of 32) are not much faster than 16"
    assert profile.kv_blocks_total == 64 and profile.block_size == 16
    assert profile.threads == torch.get_num_threads() and profile.measured_at > 1e9
    assert engine.scheduler.policy is closed and not closed.activated
    assert_idle(engine)
    # the engine still serves afterwards
    closed.set_prefill_active(True, 0.0)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0), arrival_time=0.0)
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(engine)


def test_a_zero_time_budget_measures_only_the_first_length(model):
    engine = engine_for(model, num_kv_blocks=64)
    profile = profile_prefill(engine, [128, 16, 64, 5000], repeats=1, warmup=0, time_budget=0.0)
    assert [n for n, _ in profile.points] == [16], "shortest first; 5000 exceeds the context anyway"
    assert_idle(engine)


def test_profiling_needs_an_idle_engine_and_sane_arguments(model):
    engine = engine_for(model, num_kv_blocks=64)
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        profile_prefill(engine, quick=True)
    engine.abort_request("busy")
    with pytest.raises(ValueError, match="repeats"):
        profile_prefill(engine, quick=True, repeats=0)
    with pytest.raises(ValueError, match="no profile length"):
        profile_prefill(engine, [engine.max_model_len])
    assert_idle(engine)


def test_a_bare_model_gets_a_temporary_engine(model):
    profile = profile_prefill(model, [16, 48], repeats=1)
    assert [n for n, _ in profile.points] == [16, 48]
    assert profile.kv_blocks_total == 4, "just enough blocks for 48 prompt tokens and one generated"


def test_default_lengths_double_up_to_the_context():
    assert default_lengths(100) == [16, 32, 64]
    assert default_lengths(2048) == [16, 32, 64, 128, 256, 512, 1024]
    assert default_lengths(2049)[-1] == 2048


def test_profile_round_trips_through_msgpack():
    profile = PrefillProfile([(16, 0.01), (32, 0.015), (64, 0.03)], 512, 16, 1.7e9, 1)
    wire = msgpack.unpackb(msgpack.packb(profile.to_dict()))
    assert PrefillProfile.from_dict(wire) == profile
    bad = profile.to_dict() | {"points": [[16, "fast"]]}
    with pytest.raises(ValueError, match=r"points\[0\]"):
        PrefillProfile.from_dict(bad)
    with pytest.raises(ValueError, match="block_size"):
        PrefillProfile.from_dict(profile.to_dict() | {"block_size": True})
    with pytest.raises(ValueError, match="increasing"):
        PrefillProfile([(32, 0.1), (16, 0.2)], 1, 16, 0.0, 1)


async def test_the_startup_profile_is_cached_by_what_it_depends_on(model, tmp_path):
    from services.instance.engine.async_engine import AsyncEngine
    from services.instance.startup_profile import startup_profile

    engine = AsyncEngine(engine_for(model, num_kv_blocks=8, policy="padg"))  # 128-token context: 16..64
    engine.start()
    try:
        first = await startup_profile(engine, tmp_path)
        assert first is not None and [n for n, _ in first.points] == [16, 32, 64]
        (cached,) = tmp_path.glob("*.json")
        assert await startup_profile(engine, tmp_path) == first, "read back, not measured again"
        cached.write_text("{not json")
        remeasured = await startup_profile(engine, tmp_path)
        assert remeasured is not None and remeasured.measured_at > first.measured_at
        assert await startup_profile(engine, tmp_path) == remeasured, "the broken file was replaced"
        assert await startup_profile(engine, None) != remeasured, "no cache dir: always measured"
    finally:
        await engine.shutdown()
    other = AsyncEngine(engine_for(model, num_kv_blocks=9, policy="padg"))  # another pool: another key
    other.start()
    try:
        assert (await startup_profile(other, tmp_path)).kv_blocks_total == 9
        assert len(list(tmp_path.glob("*.json"))) == 2
    finally:
        await other.shutdown()
