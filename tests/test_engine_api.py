"""The engine's request surface: sampling through the engine, parameter errors, logprobs, stats."""

from __future__ import annotations

import math

import pytest
import torch

from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.models.loader import load_model, load_tokenizer


@pytest.fixture(scope="module")
def llama(tiny_models):
    path = tiny_models["llama"]
    model = load_model(path, dtype="float32", attn_implementation=ATTENTION_NAME)
    return model, load_tokenizer(path), path


def make_engine(llama, **config) -> LLMEngine:
    model = llama[0]
    return LLMEngine(model, eos_token_ids_of(model), EngineConfig(**config))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


PROMPTS = [[5, 17, 300, 41, 9, 77], [400, 12, 13, 14], list(range(100, 140))]


def test_a_seed_reproduces_its_output_in_any_batch(llama):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234)
    alone = tokens(run(make_engine(llama), {"a": (PROMPTS[0], params)})["a"])
    batch = run(
        make_engine(llama),
        {
            "x": (PROMPTS[1], SamplingParams(max_tokens=20, temperature=1.0)),
            "a": (PROMPTS[0], SamplingParams(max_tokens=20, temperature=1.0, seed=1234)),
            "y": (PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.7, seed=7)),
        },
    )
    assert tokens(batch["a"]) == alone
    other_seed = tokens(
        run(make_engine(llama), {"a": (PROMPTS[0], SamplingParams(max_tokens=20, seed=99))})["a"]
    )
    assert other_seed != alone


def test_top_k_1_equals_greedy(llama):
    greedy = run(
        make_engine(llama),
        {str(i): (p, SamplingParams(max_tokens=16, temperature=0)) for i, p in enumerate(PROMPTS)},
    )
    top1 = run(
        make_engine(llama),
        {str(i): (p, SamplingParams(max_tokens=16, temperature=1.3, top_k=1)) for i, p in enumerate(PROMPTS)},
    )
    for rid in greedy:
        assert tokens(greedy[rid]) == tokens(top1[rid])


def test_logprobs_describe_the_raw_distribution(llama):
    outs = run(
        make_engine(llama), {"a": (PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=3))}
    )
    first = outs["a"][0]
    (lp,) = first.new_logprobs
    reference = load_model(llama[2], dtype="float32", attn_implementation="sdpa")
    with torch.inference_mode():
        expected = torch.log_softmax(reference(torch.tensor([PROMPTS[0]])).logits[0, -1].float(), -1)
    top = torch.topk(expected, 3)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert lp.token_id == first.new_token_ids[0]
    assert lp.rank == 1, "a greedy token is the most likely one"
    assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id
    assert math.isclose(lp.top[0][1], lp.logprob, rel_tol=1e-6)
    assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    assert lp.logprob <= 0.0


def test_usage_counts_and_stop_reason(llama):
    outs = run(
        make_engine(llama),
        {"a": (PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))},
    )["a"]
    last = outs[-1]
    assert last.finished and last.finish_reason == "length"
    assert last.num_prompt_tokens == len(PROMPTS[0]) and last.num_output_tokens == 5
    assert [o.finished for o in outs] == [False] * 4 + [True]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"logprobs": 50}, "logprobs"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_parameters_name_the_field(llama, params, field):
    engine = make_engine(llama)
    with pytest.raises(ParameterError) as info:
        engine.add_request("r", PROMPTS[0], SamplingParams.from_dict(params))
    assert info.value.field == field
    assert field in str(info.value)
    assert not engine.has_unfinished_requests()


def test_bad_prompts_name_the_field(llama):
    engine = make_engine(llama, max_model_len=64)
    with pytest.raises(ParameterError, match="prompt") as info:
        engine.add_request("r", [], SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(ParameterError, match="context is 64 tokens") as info:
        engine.add_request("r", list(range(1, 65)), SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(ParameterError) as info:
        engine.add_request("r", [1, 2, 10**9], SamplingParams())
    assert info.value.field == "prompt_token_ids"
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", [1, 2], SamplingParams())


def test_generation_stops_at_the_context_length(llama):
    engine = make_engine(llama, max_model_len=16)
    outs = run(
        engine, {"a": (list(range(1, 13)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))}
    )
    assert outs["a"][-1].finish_reason == "length"
    assert outs["a"][-1].num_output_tokens == 4


def test_kv_pool_is_sized_from_the_byte_budget(llama):
    cfg = llama[0].config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32
    engine = make_engine(llama, kv_cache_bytes=per_token * 16 * 10 + 5, block_size=16)
    stats = engine.stats()
    assert stats.kv_blocks_total == 10 and stats.kv_blocks_free == 10
    assert stats.max_model_len == 160, "a sequence can never need more than the whole pool"
    with pytest.raises(ValueError, match="holds no block"):
        make_engine(llama, kv_cache_bytes=100)
