"""The engine's greedy fp32 tokens equal per-prompt `model.generate(do_sample=False)`, whatever the batching,
chunking, preemption or arrival order; and every KV block is free afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.sampling_params import SamplingParams
from services.instance.models.loader import load_model, load_tokenizer

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import os",
    'class Request:\n    """An HTTP request with headers, a body and a method, '
    'parsed lazily from the socket."""\n'
    "    def __init__(self, method, path, headers):\n        self.method = method\n",
    "for i in range(10): print(i * i)",
    "The quick brown fox jumps over the lazy dog while the scheduler batches every request it can",
]
MAX_NEW = 24


class Models:
    """A paged model (shared by engines) and an sdpa reference model, with cached reference outputs."""

    def __init__(self, path):
        self.path = path
        self.tokenizer = load_tokenizer(path)
        self.paged = load_model(path, dtype="float32", attn_implementation=ATTENTION_NAME)
        self.ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        self.ref.eval()
        self.eos = eos_token_ids_of(self.ref)
        self.prompts = [self.tokenizer(t)["input_ids"] for t in TEXTS]
        self._cache: dict[tuple, list[int]] = {}

    def reference(
        self, prompt: list[int], max_new: int = MAX_NEW, eos: frozenset[int] | None = None
    ) -> list[int]:
        eos = frozenset(self.eos if eos is None else eos)
        key = (tuple(prompt), max_new, eos)
        if key not in self._cache:
            with torch.inference_mode():
                out = self.ref.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=sorted(eos),
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            self._cache[key] = out[0, len(prompt) :].tolist()
        return self._cache[key]

    def engine(self, eos: set[int] | None = None, **config) -> LLMEngine:
        return LLMEngine(self.paged, self.eos if eos is None else eos, EngineConfig(**config))


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tiny_models) -> Models:
    return Models(tiny_models[request.param])


def greedy(max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def run_to_completion(engine: LLMEngine, *, on_step=None, max_steps: int = 10_000) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    while engine.has_unfinished_requests():
        if on_step is not None:
            on_step(step, engine)
        for out in engine.step(now=float(step)):
            assert out.request_id not in finished, "output after finish"
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        step += 1
        assert step < max_steps, "engine did not finish"
    return tokens


def assert_all_blocks_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total, stats
    assert stats.num_running == stats.num_waiting == 0


def test_prompts_are_ragged_and_cross_the_sliding_window(models: Models):
    lengths = sorted(len(p) for p in models.prompts)
    assert lengths[0] < 8 and lengths[-1] > 40
    if "mistral" in str(models.path):
        window = models.ref.config.sliding_window
        assert window < lengths[-1] + MAX_NEW, "the test must exercise the sliding window"


@pytest.mark.parametrize("policy", ["nodg", "sarathi"])
def test_packed_prefill_then_batched_decode(models: Models, policy: str):
    engine = models.engine(policy=policy, max_num_batched_tokens=4096)
    for i, p in enumerate(models.prompts):
        engine.add_request(str(i), p, greedy())
    first = engine.step(now=0.0)
    stats = engine.stats()
    assert stats.num_steps == 1 and stats.prefill_tokens_total == sum(len(p) for p in models.prompts)
    assert len(first) == len(models.prompts), "all prompts prefilled in one packed step"
    firsts = {o.request_id: o.new_token_ids for o in first}
    got = run_to_completion(engine)
    for i, p in enumerate(models.prompts):
        assert firsts[str(i)] + got.get(str(i), []) == models.reference(p), f"prompt {i}"
    assert_all_blocks_free(engine)


def test_chunked_prefill_under_small_budget(models: Models):
    engine = models.engine(policy="sarathi", max_num_batched_tokens=7)
    for i, p in enumerate(models.prompts):
        engine.add_request(str(i), p, greedy())
    got = run_to_completion(engine)
    for i, p in enumerate(models.prompts):
        assert got[str(i)] == models.reference(p), f"prompt {i}"
    assert engine.stats().num_steps > MAX_NEW + max(len(p) for p in models.prompts) // 7
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("policy", ["nodg", "sarathi"])
def test_request_joins_mid_decode(models: Models, policy: str):
    engine = models.engine(policy=policy, max_num_batched_tokens=64)
    engine.add_request("0", models.prompts[0], greedy())
    engine.add_request("1", models.prompts[1], greedy())

    def join(step: int, e: LLMEngine) -> None:
        if step == 5:
            e.add_request("2", models.prompts[2], greedy())
        if step == 9:
            e.add_request("3", models.prompts[3], greedy(MAX_NEW // 2))

    got = run_to_completion(engine, on_step=join)
    assert got["0"] == models.reference(models.prompts[0])
    assert got["1"] == models.reference(models.prompts[1])
    assert got["2"] == models.reference(models.prompts[2])
    assert got["3"] == models.reference(models.prompts[3], MAX_NEW // 2)
    assert_all_blocks_free(engine)


def test_early_eos(models: Models):
    # Declare a token that greedy decoding produces mid-way to be an EOS, on both sides.
    plain = models.reference(models.prompts[0])
    stop_token = plain[6]
    eos = set(models.eos) | {stop_token}
    engine = models.engine(eos=eos, policy="sarathi")
    for i, p in enumerate(models.prompts):
        engine.add_request(str(i), p, greedy())
    got = run_to_completion(engine)
    expected0 = models.reference(models.prompts[0], eos=frozenset(eos))
    assert expected0[-1] == stop_token and len(expected0) <= 7
    for i, p in enumerate(models.prompts):
        assert got[str(i)] == models.reference(p, eos=frozenset(eos)), f"prompt {i}"
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("policy", ["nodg", "sarathi"])
def test_small_kv_pool_preempts_and_recomputes(models: Models, policy: str):
    longest = max(len(p) for p in models.prompts) + MAX_NEW
    blocks = -(-longest // 4) + 3  # room for the longest sequence and a little more, far from all five
    engine = models.engine(policy=policy, block_size=4, num_kv_blocks=blocks, max_num_batched_tokens=128)
    for i, p in enumerate(models.prompts):
        engine.add_request(str(i), p, greedy())
    got = run_to_completion(engine)
    assert engine.stats().num_preemptions > 0, "the pool was meant to be too small"
    for i, p in enumerate(models.prompts):
        assert got[str(i)] == models.reference(p), f"prompt {i}"
    assert_all_blocks_free(engine)


def test_abort_mid_generation(models: Models):
    engine = models.engine(policy="sarathi")
    for i, p in enumerate(models.prompts):
        engine.add_request(str(i), p, greedy())

    def abort(step: int, e: LLMEngine) -> None:
        if step == 4:
            assert e.abort_request("1")
            assert e.stats().kv_blocks_used > 0

    got = run_to_completion(engine, on_step=abort)
    assert len(got["1"]) < MAX_NEW
    assert got["1"] == models.reference(models.prompts[1])[: len(got["1"])]
    for i in (0, 2, 3, 4):
        assert got[str(i)] == models.reference(models.prompts[i]), f"prompt {i}"
    assert not engine.abort_request("1"), "a finished request cannot be aborted twice"
    assert_all_blocks_free(engine)


def test_arrival_order_does_not_matter(models: Models):
    engine = models.engine(policy="sarathi", max_num_batched_tokens=32)
    order = [4, 2, 0, 3, 1]
    pending = list(order)

    def trickle(step: int, e: LLMEngine) -> None:
        if pending and step % 3 == 0:
            i = pending.pop(0)
            e.add_request(str(i), models.prompts[i], greedy())

    trickle(0, engine)
    got = run_to_completion(engine, on_step=lambda s, e: trickle(s + 1, e))
    assert not pending
    for i in order:
        assert got[str(i)] == models.reference(models.prompts[i]), f"prompt {i}"
    assert_all_blocks_free(engine)
