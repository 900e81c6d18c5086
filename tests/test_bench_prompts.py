"""Prompts made to measure: token ids of exact length in range, text that the server's tokenizer counts to the
target length, and the same prompt for the same request index in every run."""

from __future__ import annotations

import pytest

from services.bench.prompts import PromptMaker, load_tokenizer
from services.bench.workloads import RequestSpec


def test_token_id_prompts_have_the_exact_length_and_stay_in_range():
    maker = PromptMaker("ids", seed=1, id_range=(100, 200))
    for index, length in enumerate((1, 7, 300)):
        prompt, input_len = maker.make(index, RequestSpec(length, 4))
        assert isinstance(prompt, list) and len(prompt) == input_len == length
        assert all(100 <= t < 200 for t in prompt)


def test_prompts_depend_on_seed_and_index_only():
    a, b = PromptMaker("ids", seed=1), PromptMaker("ids", seed=1)
    assert a.make(5, RequestSpec(20, 4)) == b.make(5, RequestSpec(20, 4))
    assert a.make(5, RequestSpec(20, 4)) != a.make(6, RequestSpec(20, 4))
    assert a.make(5, RequestSpec(20, 4)) != PromptMaker("ids", seed=2).make(5, RequestSpec(20, 4))


def test_text_without_tokenizer_is_one_word_per_token_and_length_unknown():
    prompt, input_len = PromptMaker("text", seed=0).make(0, RequestSpec(12, 4))
    assert isinstance(prompt, str) and len(prompt.split()) == 12 and input_len is None


def test_given_prompts_pass_through():
    maker = PromptMaker("ids")
    assert maker.make(0, RequestSpec(None, 3, "hi")) == ("hi", None)
    assert maker.make(0, RequestSpec(2, 3, [5, 6])) == ([5, 6], 2)
    with pytest.raises(ValueError, match="--tokenizer"):
        PromptMaker("text").make(0, RequestSpec(2, 3, [5, 6]))


def test_bad_id_range_is_rejected():
    with pytest.raises(ValueError):
        PromptMaker("ids", id_range=(10, 10))


def test_tokenizer_text_counts_to_the_target_and_ids_avoid_special_tokens(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["llama"]))
    special = set(tokenizer.all_special_ids)
    text_maker = PromptMaker("text", seed=3, tokenizer=tokenizer)
    for index, target in enumerate((5, 40, 200)):
        text, count = text_maker.make(index, RequestSpec(target, 4))
        assert isinstance(text, str)
        assert count == target == len(tokenizer(text)["input_ids"])
    ids, _ = PromptMaker("ids", seed=3, tokenizer=tokenizer).make(0, RequestSpec(2000, 4))
    assert not special & set(ids) and max(ids) < len(tokenizer)
    assert PromptMaker("text", tokenizer=tokenizer).make(0, RequestSpec(None, 2, [300, 301]))[0] == (
        tokenizer.decode([300, 301])
    )
