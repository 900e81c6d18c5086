"""Request validation for the router (pure): every bad input is a 400 naming its field; extras are tolerated;
OpenAI names map to the engine's; the context window is enforced."""

from __future__ import annotations

from typing import Any

import pytest

from services.router.errors import APIError
from services.router.parsing import (
    MAX_CHOICES,
    MAX_N,
    check_sampling,
    parse_chat,
    parse_completion,
)
from services.router.prompts import check_token_ids, fit_max_tokens

USER = [{"role": "user", "content": "hi"}]


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hello", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, **fields}


def rejected(parse, body: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


COMPLETION_CASES = [
    (completion(model=5), "model"),
    ({"model": "m"}, "prompt"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=7), "prompt"),
    (completion(prompt=[1, -2]), "prompt"),
    (completion(prompt=["ok", ""]), "prompt[1]"),
    (completion(prompt=[[1, 2], 5]), "prompt[1]"),
    (completion(prompt=[[1, 2], []]), "prompt[1]"),
    (completion(prompt=[True]), "prompt[0]"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(max_tokens=-3), "max_tokens"),
    (completion(max_tokens="5"), "max_tokens"),
    (completion(max_tokens=2.5), "max_tokens"),
    (completion(max_tokens=True), "max_tokens"),
    (completion(temperature=-0.1), "temperature"),
    (completion(temperature=2.01), "temperature"),
    (completion(temperature="hot"), "temperature"),
    (completion(top_p=0), "top_p"),
    (completion(top_p=1.5), "top_p"),
    (completion(top_k=-2), "top_k"),
    (completion(top_k=1.5), "top_k"),
    (completion(min_p=1.5), "min_p"),
    (completion(n=0), "n"),
    (completion(n=MAX_N + 1), "n"),
    (completion(n="2"), "n"),
    (completion(prompt=["a"] * 3, n=MAX_CHOICES // 2), "n"),
    (completion(logprobs=21), "logprobs"),
    (completion(logprobs=-1), "logprobs"),
    (completion(logprobs=True), "logprobs"),
    (completion(stop=""), "stop"),
    (completion(stop=["ok", 3]), "stop"),
    (completion(stop={"a": 1}), "stop"),
    (completion(stop_token_ids=[-1]), "stop_token_ids"),
    (completion(stop_token_ids="2"), "stop_token_ids"),
    (completion(seed="x"), "seed"),
    (completion(presence_penalty=2.5), "presence_penalty"),
    (completion(frequency_penalty=-3), "frequency_penalty"),
    (completion(repetition_penalty=0), "repetition_penalty"),
    (completion(min_tokens=-1), "min_tokens"),
    (completion(min_tokens=20, max_tokens=10), "min_tokens"),
    (completion(stream="yes"), "stream"),
    (completion(stream_options="x"), "stream_options"),
    (completion(stream=True, stream_options={"include_usage": "y"}), "stream_options.include_usage"),
    (completion(ignore_eos="true"), "ignore_eos"),
    (completion(logit_bias={"5": 10}), "logit_bias"),
    (completion(echo=True), "echo"),
    (completion(suffix="tail"), "suffix"),
    (completion(best_of=3), "best_of"),
    (completion(add_special_tokens="no"), "add_special_tokens"),
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_CASES)
def test_bad_completion_fields_are_named(body: dict[str, Any], param: str) -> None:
    error = rejected(parse_completion, body)
    assert error.param == param, error.message
    assert (
        error.body()["error"]["param"] == param and error.body()["error"]["type"] == "invalid_request_error"
    )


CHAT_CASES = [
    ({"model": "m"}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=[5]), "messages[0]"),
    (chat(messages=[{"content": "no role"}]), "messages[0].role"),
    (chat(messages=[*USER, {"role": "wizard", "content": "x"}]), "messages[1].role"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[0].content[0]",
    ),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(logprobs="yes"), "logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(response_format={"type": "json_schema"}), "response_format"),
    (chat(continue_final_message=True), "continue_final_message"),
    (chat(chat_template_kwargs=[1]), "chat_template_kwargs"),
    (chat(chat_template_kwargs={"return_tensors": "pt"}), "chat_template_kwargs.return_tensors"),
    (chat(temperature=3), "temperature"),
    (chat(n=0), "n"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_CASES)
def test_bad_chat_fields_are_named(body: dict[str, Any], param: str) -> None:
    assert rejected(parse_chat, body).param == param


@pytest.mark.parametrize("body", [None, [], "text", 5])
def test_a_body_that_is_not_an_object_is_400(body: Any) -> None:
    assert rejected(parse_completion, body).param is None
    assert rejected(parse_chat, body).param is None


def test_vllm_bench_payloads_and_unknown_extras_are_tolerated() -> None:
    # What `vllm bench serve` sends, plus vendor fields nobody here knows.
    body = completion(
        prompt="hi",
        max_tokens=32,
        temperature=0.0,
        repetition_penalty=1.0,
        logprobs=None,
        stream=True,
        stream_options={"include_usage": True},
        ignore_eos=True,
        best_of=1,
        user="someone",
        guided_decoding_backend="xgrammar",
        some_vendor_field={"nested": [1, 2]},
    )
    parsed = parse_completion(body)
    assert parsed.stream and parsed.include_usage and parsed.max_tokens == 32 and parsed.logprobs is None
    assert parsed.sampling["ignore_eos"] is True and parsed.sampling["repetition_penalty"] == 1.0
    assert parsed.sampling["temperature"] == 0.0


def test_nulls_mean_not_given() -> None:
    parsed = parse_chat(
        chat(stop=None, max_tokens=None, seed=None, n=None, temperature=None, top_logprobs=None)
    )
    assert parsed.stop == () and parsed.max_tokens is None and parsed.n == 1 and "seed" not in parsed.sampling


def test_completion_prompt_forms() -> None:
    assert parse_completion(completion(prompt="text")).prompts == ("text",)
    assert parse_completion(completion(prompt=[1, 2, 3])).prompts == ((1, 2, 3),)
    assert parse_completion(completion(prompt=["only one"])).prompts == ("only one",)
    parsed = parse_completion(completion(prompt=["a", [4, 5]], n=3))
    assert parsed.prompts == ("a", (4, 5)) and parsed.num_choices == 6
    assert parse_completion(completion(max_tokens=16.0)).max_tokens == 16  # JSON numbers: 16.0 is 16


def test_completion_defaults_follow_openai() -> None:
    parsed = parse_completion(completion())
    assert parsed.max_tokens == 16 and parsed.n == 1 and not parsed.stream and parsed.add_special_tokens
    assert parsed.stop == () and parsed.skip_special_tokens


def test_sampling_names_map_to_the_engine() -> None:
    parsed = parse_completion(
        completion(
            stop=["END", "END", "\n\n"],
            stop_token_ids=[2],
            top_k=40,
            min_p=0.05,
            seed=3,
            min_tokens=2,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logprobs=3,
        )
    )
    assert parsed.stop == ("END", "\n\n")  # deduplicated, order kept
    params = check_sampling(parsed, 10)
    assert (params.max_tokens, params.top_k, params.min_p, params.seed, params.min_tokens) == (
        10,
        40,
        0.05,
        3,
        2,
    )
    assert params.stop_token_ids == [2] and params.logprobs == 3
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)


def test_chat_logprobs_and_max_completion_tokens() -> None:
    assert parse_chat(chat()).logprobs is None
    assert parse_chat(chat(logprobs=True)).logprobs == 0
    assert parse_chat(chat(logprobs=True, top_logprobs=5)).logprobs == 5
    parsed = parse_chat(chat(max_completion_tokens=7, max_tokens=99))
    assert parsed.max_tokens == 7  # the newer name wins
    # Engine-side errors name the field the client sent.
    with pytest.raises(APIError) as caught:
        check_sampling(parsed, 0)
    assert caught.value.param == "max_completion_tokens"


def test_chat_messages_are_normalized() -> None:
    parsed = parse_chat(
        chat(
            messages=[
                {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "user", "content": "q", "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": []},
            ],
            add_generation_prompt=False,
            continue_final_message=True,
        )
    )
    assert parsed.messages == (
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": ""},
    )
    assert (
        parsed.continue_final_message and not parsed.add_generation_prompt and not parsed.add_special_tokens
    )


def test_fit_max_tokens() -> None:
    parsed = parse_completion(completion(max_tokens=10))
    assert fit_max_tokens(parsed, 5, 100) == 10
    assert fit_max_tokens(parsed, 90, 100) == 10
    with pytest.raises(APIError) as caught:
        fit_max_tokens(parsed, 91, 100)
    assert caught.value.param == "max_tokens" and "101" in caught.value.message
    with pytest.raises(APIError) as caught:
        fit_max_tokens(parsed, 100, 100)
    assert caught.value.param == "prompt"
    assert fit_max_tokens(parsed, 500, None) == 10  # no known limit: the engine decides

    open_ended = parse_chat(chat())
    assert fit_max_tokens(open_ended, 30, 100) == 70
    with pytest.raises(APIError) as caught:
        fit_max_tokens(open_ended, 100, 100)
    assert caught.value.param == "messages"
    with pytest.raises(APIError) as caught:
        fit_max_tokens(open_ended, 10, None)
    assert caught.value.param == "max_tokens"
    with pytest.raises(APIError) as caught:
        fit_max_tokens(parse_chat(chat(max_completion_tokens=50)), 60, 100)
    assert caught.value.param == "max_completion_tokens"


def test_token_ids_must_be_in_the_vocabulary() -> None:
    check_token_ids([0, 99], 100, "prompt")
    with pytest.raises(APIError) as caught:
        check_token_ids([0, 100], 100, "stop_token_ids")
    assert caught.value.param == "stop_token_ids"
