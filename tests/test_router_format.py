"""The router's pure pieces: choices (detokenization, stop strings, finish), OpenAI chunk and logprob shapes,
SSE framing, error bodies, and how the Redis instance table is read."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from services.router import openai_format as fmt
from services.router.choice import ChoiceState
from services.router.cluster import ClusterSnapshot, InstanceView, _lease_state
from services.router.errors import APIError, error_body
from services.router.shapers import ChatShaper, CompletionShaper
from services.router.token_text import TokenText
from shared import subjects
from shared.messages import InstanceInfo, InstanceStatus, TokenChunk, TokenLogprob
from shared.wire import encode


@pytest.fixture(scope="module")
def tokenizer(tiny_models: dict[str, Path]) -> PreTrainedTokenizerBase:
    return PreTrainedTokenizerFast.from_pretrained(tiny_models["llama"])


def ids_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk(seq: int, token_ids: list[int], *, finished: bool = False, **fields) -> TokenChunk:
    return TokenChunk(
        request_id="r",
        seq=seq,
        token_ids=token_ids,
        finished=finished,
        prompt_tokens=3,
        completion_tokens=0,
        **fields,
    )


def logprob(token_id: int, value: float = -0.5) -> TokenLogprob:
    return TokenLogprob(
        token_id=token_id, logprob=value, rank=1, top_ids=[token_id, 7], top_logprobs=[value, -2.0]
    )


# ---- choices -----------------------------------------------------------------------------------------------


def test_a_stop_string_cuts_the_text_and_the_tokens(tokenizer) -> None:
    ids = ids_of(tokenizer, "alpha beta STOP gamma")
    state = ChoiceState(0, tokenizer, [5, 6], stop=["STOP"])
    first = state.apply(chunk(0, ids[:2], logprobs=[logprob(t) for t in ids[:2]]))
    assert first is not None and first.finish_reason is None
    rest = ids[2:]
    update = state.apply(chunk(1, rest, logprobs=[logprob(t) for t in rest]))
    assert update is not None
    assert first.text + update.text == "alpha beta "
    assert (update.finish_reason, update.stop_reason, update.stopped_by_router) == ("stop", "STOP", True)
    # Tokens, logprobs and usage end at the token that completed the stop string.
    assert list(update.token_ids) == ids[2:4] and [lp.token_id for lp in update.logprobs] == ids[2:4]
    assert state.completion_tokens == 4 and state.finished
    assert state.apply(chunk(2, [9, 9])) is None  # chunks still in flight are dropped


def test_a_stop_string_in_the_last_chunk_needs_no_abort(tokenizer) -> None:
    state = ChoiceState(0, tokenizer, [], stop=["END"], include_stop_str_in_output=True)
    update = state.apply(chunk(0, ids_of(tokenizer, "x END y"), finished=True, finish_reason="length"))
    assert update.text == "x END" and update.finish_reason == "stop" and not update.stopped_by_router


def test_the_engines_finish_reason_passes_through(tokenizer) -> None:
    state = ChoiceState(0, tokenizer, [])
    ids = ids_of(tokenizer, "a😀b")
    texts = [state.apply(chunk(i, [t])).text for i, t in enumerate(ids[:-1])]
    last = state.apply(chunk(len(ids) - 1, [ids[-1], 2], finished=True, finish_reason="stop", stop_reason=2))
    texts.append(last.text)
    # The emoji's four byte tokens show as one character, once complete; the EOS token is not text.
    assert "".join(texts) == "a😀b" and not any("\ufffd" in t for t in texts)
    assert texts[1:4] == ["", "", ""]
    assert (last.finish_reason, last.stop_reason) == ("stop", 2) and state.completion_tokens == len(ids) + 1


def test_held_back_text_is_released_at_the_end(tokenizer) -> None:
    state = ChoiceState(0, tokenizer, [], stop=["STOPPER"])
    held = state.apply(chunk(0, ids_of(tokenizer, "x STOP")))
    assert held.text == "x "  # "STOP" might start the stop string
    last = state.apply(chunk(1, [], finished=True, finish_reason="length"))
    assert last.text == "STOP" and last.finish_reason == "length"


# ---- shapes ------------------------------------------------------------------------------------------------


def test_sse_framing_keeps_unicode() -> None:
    assert fmt.sse({"text": "日本"}) == 'data: {"text":"日本"}\n\n'.encode()
    assert fmt.DONE == b"data: [DONE]\n\n"


def test_chat_stream_chunks(tokenizer) -> None:
    shaper = ChatShaper("chatcmpl-1", 123, "m", 2, None)
    state = ChoiceState(1, tokenizer, [])
    ids = ids_of(tokenizer, "hello world")
    head = tokenizer.decode(ids[:1])
    first = shaper.chunk(state.apply(chunk(0, ids[:1])))
    assert (
        first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-1" and first["created"] == 123
    )
    assert first["choices"] == [
        {
            "index": 1,
            "delta": {"role": "assistant", "content": head},
            "logprobs": None,
            "finish_reason": None,
            "stop_reason": None,
        }
    ]
    last = shaper.chunk(state.apply(chunk(1, ids[1:], finished=True, finish_reason="length")))
    assert (
        last["choices"][0]["delta"] == {"content": "hello world".removeprefix(head)}
        and last["choices"][0]["finish_reason"] == "length"
    )


def test_full_responses_gather_every_choice(tokenizer) -> None:
    shaper = CompletionShaper("cmpl-1", 5, "m", 2, None)
    for index, text in enumerate(["one", "two three"]):
        state = ChoiceState(index, tokenizer, [])
        shaper.add(state.apply(chunk(0, ids_of(tokenizer, text), finished=True, finish_reason="length")))
    body = shaper.response(fmt.usage(3, 4))
    assert [c["text"] for c in body["choices"]] == ["one", "two three"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert body["object"] == "text_completion"


def test_completion_logprobs_continue_their_offsets(tokenizer) -> None:
    formatter = fmt.LogprobFormatter(TokenText(tokenizer), top_n=1)
    ids = ids_of(tokenizer, "alpha beta")
    first, offset = formatter.completion([logprob(ids[0])], 0)
    second, end = formatter.completion([logprob(ids[1], -math.inf)], offset)
    assert first["tokens"] == ["alpha"] and first["text_offset"] == [0] and offset == 5
    assert second["tokens"] == [" be"] and second["text_offset"] == [5] and end == 8
    assert second["token_logprobs"] == [fmt.MIN_LOGPROB]  # -inf is not JSON
    # top_n=1 keeps the best alternative, and the sampled token is always listed.
    assert first["top_logprobs"] == [{"alpha": -0.5}]
    json.dumps(second, allow_nan=False)


def test_chat_logprobs_carry_real_bytes(tokenizer) -> None:
    formatter = fmt.LogprobFormatter(TokenText(tokenizer), top_n=2)
    ids = ids_of(tokenizer, "a😀")
    content = formatter.chat([logprob(t) for t in ids])["content"]
    assert [entry["token"] for entry in content][1:] == ["\ufffd"] * 4  # partial characters decode to U+FFFD
    assert b"".join(bytes(entry["bytes"]) for entry in content) == "a😀".encode()
    assert [top["logprob"] for top in content[0]["top_logprobs"]] == [-0.5, -2.0]


def test_sentencepiece_token_bytes() -> None:
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    model.train_from_iterator(["hello world hello there world peace"] * 20, trainer)
    spec = json.loads(model.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    model = Tokenizer.from_str(json.dumps(spec))
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    text = TokenText(tok)
    ids = tok("hello world é", add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(text.bytes(t)) for t in ids) == " hello world é".encode()


def test_error_bodies_and_retry_after() -> None:
    assert error_body(400, "bad", param="n", code="invalid_value") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}
    }
    response = APIError(429, "busy", retry_after=0.2).response()
    assert response.status == 429 and response.headers["Retry-After"] == "1"
    assert APIError(503, "down", retry_after=2.5).response().headers["Retry-After"] == "3"
    assert "Retry-After" not in APIError(400, "bad").response().headers


# ---- the instance table ------------------------------------------------------------------------------------


def info(instance_id: str, max_model_len: int) -> InstanceInfo:
    return InstanceInfo(
        instance_id=instance_id,
        model="m",
        subjects=subjects.instance_subjects("p", instance_id),
        kv_blocks_total=10,
        block_size=16,
        max_model_len=max_model_len,
        policy="nodg",
        pid=1,
        host="h",
        started_at=0.0,
    )


def test_lease_values() -> None:
    status = InstanceStatus(
        instance_id="a",
        seq=3,
        time=time.time(),
        state="draining",
        phase="decode",
        num_running=2,
        num_waiting=1,
        kv_blocks_free=4,
        kv_blocks_total=10,
        num_preemptions=0,
        requests=[],
    )
    state, decoded = _lease_state(encode(status))
    assert state == "draining" and decoded == status
    assert _lease_state(b"starting") == ("starting", None)
    assert _lease_state(b"READY\n") == ("ready", None)
    assert _lease_state(b"coordinator-1") == ("ready", None)  # just alive


def test_snapshot_readiness_and_context_length() -> None:
    live = (
        InstanceView(info("a", 4096), "ready", None),
        InstanceView(info("b", 2048), "starting", None),
    )
    snapshot = ClusterSnapshot(live=live, registered=3)
    assert [view.info.instance_id for view in snapshot.ready] == ["a"]
    assert snapshot.max_model_len() == 2048  # any live instance may get the request
    assert ClusterSnapshot(live=(), registered=0).max_model_len() is None
