"""The correctness oracle under `padg`: whatever the windows, greedy fp32 tokens equal per-prompt
`model.generate`, and every KV block is free afterwards."""

from __future__ import annotations

import pytest
from test_engine_golden import ARCHS, Models, assert_all_blocks_free, greedy

from services.instance.engine.llm_engine import LLMEngine
from services.instance.engine.policies import NoDGPolicy, PaDGPolicy, SarathiPolicy

MAX_NEW = 12


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tiny_models) -> Models:
    return Models(tiny_models[request.param])


def run_with_windows(
    engine: LLMEngine, models: Models, order: list[int], *, toggle_every: int, arrive_every: int
) -> tuple[dict[str, list[int]], int]:
    """Open/close the window every `toggle_every` steps while prompts arrive every `arrive_every` steps;
    returns the tokens and how many steps a closed window left a prompt waiting."""
    policy = engine.scheduler.policy
    assert isinstance(policy, PaDGPolicy)
    pending = list(order)
    tokens: dict[str, list[int]] = {}
    held_back = 0
    step = 0
    while pending or engine.has_unfinished_requests():
        now = float(step)
        if step % toggle_every == 0:
            policy.set_prefill_active(not policy.activated, now)
        if pending and step % arrive_every == 0:
            i = pending.pop(0)
            engine.add_request(str(i), models.prompts[i], greedy(MAX_NEW), arrival_time=now)
        for out in engine.step(now):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        held_back += not policy.activated and engine.stats().num_waiting > 0
        step += 1
        assert step < 2000, "engine did not finish"
    return tokens, held_back


@pytest.mark.parametrize("pool", ["roomy", "tight"])
def test_toggled_windows_with_trickling_arrivals(models: Models, pool: str):
    longest = max(len(p) for p in models.prompts) + MAX_NEW
    config = {"roomy": {}, "tight": {"block_size": 4, "num_kv_blocks": -(-longest // 4) + 1}}[pool]
    # Longest first fills the tight pool early, so later decodes must preempt.
    order = {"roomy": [3, 0, 4, 1, 2], "tight": [2, 4, 0, 3, 1]}[pool]
    engine = models.engine(policy="padg", max_num_batched_tokens=64, **config)
    policy = engine.scheduler.policy = PaDGPolicy(admit_grace=0.0)
    got, held_back = run_with_windows(engine, models, order, toggle_every=3, arrive_every=2)
    assert held_back > 0, "some prompt must have waited for the next window"
    assert policy.num_switches > 4
    if pool == "tight":
        assert engine.stats().num_preemptions > 0, "the pool was meant to be too small"
    for i in order:
        assert got[str(i)] == models.reference(models.prompts[i], MAX_NEW), f"prompt {i}"
    assert_all_blocks_free(engine)


def test_policies_swapped_between_steps(models: Models):
    # sarathi leaves a prompt half chunked, padg (closed) finishes it and holds a newcomer back, then nodg.
    engine = models.engine(policy="sarathi", max_num_batched_tokens=8)
    padg = PaDGPolicy(finish_admitted_prefills=False)
    engine.add_request("4", models.prompts[4], greedy(MAX_NEW), arrival_time=0.0)
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests():
        if step == 1:
            engine.scheduler.policy = padg
            engine.add_request("0", models.prompts[0], greedy(MAX_NEW), arrival_time=1.0)
        if step == 12:
            assert engine.scheduler.find("0").num_computed_tokens == 0, "a closed window held it back"
            engine.scheduler.policy = NoDGPolicy()
        if step == 16:
            engine.scheduler.policy = SarathiPolicy()
        for out in engine.step(float(step)):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
        assert step < 500
    for i in (4, 0):
        assert tokens[str(i)] == models.reference(models.prompts[i], MAX_NEW), f"prompt {i}"
    assert_all_blocks_free(engine)
