"""The real default model through the engine: a sensible chat answer, and greedy output equal to
`generate` for several prompts batched together."""

from __future__ import annotations

import pytest
import torch

from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.sampling_params import SamplingParams
from services.instance.models.loader import load_model, load_tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def smol(smollm2_path):
    tokenizer = load_tokenizer(smollm2_path)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return smollm2_path, tokenizer, ids


def test_smollm2_greedy_equals_generate_and_knows_paris(smol):
    path, tokenizer, prompts = smol
    paged = load_model(path, dtype="float32", attn_implementation=ATTENTION_NAME)
    engine = LLMEngine(paged, eos_token_ids_of(paged), EngineConfig(max_num_batched_tokens=512))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    del paged, engine

    reference = load_model(path, dtype="float32", attn_implementation="sdpa")
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )
        assert got[str(i)] == out[0, len(p) :].tolist(), QUESTIONS[i]
    answer = tokenizer.decode(got["0"], skip_special_tokens=True)
    assert "Paris" in answer, answer
