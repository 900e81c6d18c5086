"""FuDG at the engine level: prefill on engine A, ship the KV through the wire encoding (KvTransfer split into
KvChunks and reassembled), decode on engine B. Greedy fp32 tokens equal `model.generate(do_sample=False)` and
a single engine's run; a seeded sampled request continues identically; no KV block leaks on either side."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from test_engine_golden import MAX_NEW, Models, assert_all_blocks_free, greedy, run_to_completion

from services.instance.engine.kv_transfer import KvPayload
from services.instance.engine.llm_engine import LLMEngine, RequestOutput
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.kv_wire import payload_of, to_transfer
from shared.kv_messages import CHUNK_OVERHEAD, ChunkAssembler, KvChunk, split_transfer
from shared.messages import DispatchRequest
from shared.wire import WireError, decode

# Llama (plain GQA) and Mistral (sliding window shorter than the longest prompt) cover the geometry cases.
ARCHS = ["llama", "mistral", "qwen3"]
CHUNK_BYTES = 4096  # far below the KV of one prompt, so every transfer is split into many chunks


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tiny_models) -> Models:
    return Models(tiny_models[request.param])


def dispatch(request_id: str, prompt: list[int], params: SamplingParams) -> DispatchRequest:
    return DispatchRequest(
        request_id=request_id,
        model="tiny",
        prompt_token_ids=prompt,
        sampling=params.to_dict(),
        reply_subject="ecoserve.router.r1.tokens",
        router_id="r1",
        arrival_time=time.time(),
        stream=True,
        instance_id="prefill-0",
        dispatch_time=time.time(),
    )


def over_the_wire(payload: KvPayload, params: SamplingParams) -> tuple[KvPayload, int]:
    """The payload after encoding, chunking, reassembly and decoding; also the number of chunks."""
    transfer = to_transfer(
        payload,
        dispatch(payload.request_id, payload.prompt_token_ids, params),
        prefill_instance_id="prefill-0",
        decode_instance_id="decode-0",
        next_seq=1,
        queue_time=0.0,
        first_token_time=time.time(),
        sent_at=time.time(),
    )
    pieces = split_transfer(transfer, f"t-{payload.request_id}", CHUNK_BYTES)
    assert all(len(p) <= CHUNK_BYTES for p in pieces)
    assembler = ChunkAssembler()
    done = [assembler.add(decode(p, KvChunk)) for p in pieces]
    assert done[:-1] == [None] * (len(pieces) - 1) and done[-1] is not None
    assert assembler.num_pending == 0
    received, _ = done[-1]
    return payload_of(received), len(pieces)


def prefill_all(engine: LLMEngine, max_steps: int = 200) -> dict[str, RequestOutput]:
    """Step the prefill engine until every request left it; its last output per request."""
    last: dict[str, RequestOutput] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step(now=float(step)):
            assert out.request_id not in last, "a prefill engine emits one output per request"
            last[out.request_id] = out
        step += 1
        assert step < max_steps
    return last


def test_greedy_transfer_equals_generate_and_single_engine(models: Models):
    params = greedy()
    if "mistral" in str(models.path):  # decoding after the import must honour the window
        assert models.ref.config.sliding_window < max(len(p) for p in models.prompts)
    # Different block sizes: the payload is token-major, so the pools need not agree.
    a = models.engine(policy="sarathi", block_size=4, max_num_batched_tokens=32, kv_export=True)
    b = models.engine(policy="sarathi", block_size=16)
    single = models.engine(policy="sarathi")
    for i, p in enumerate(models.prompts):
        a.add_request(str(i), p, params)
        single.add_request(str(i), p, params)
    alone = run_to_completion(single)
    firsts = prefill_all(a)
    assert_all_blocks_free(a)  # every block returned in the step that exported it
    bytes_per_token = a.kv_cache.geometry.bytes_per_token()
    for i, p in enumerate(models.prompts):
        out = firsts[str(i)]
        assert out.finished and out.finish_reason == "transferred" and out.num_output_tokens == 1
        payload = out.kv_payload
        assert payload is not None and payload.num_tokens == len(p)
        assert payload.kv_bytes == len(p) * bytes_per_token
        received, num_chunks = over_the_wire(payload, params)
        assert num_chunks > 1
        assert b.import_request(received, arrival_time=0.0) is True
    assert b.stats().num_running == len(models.prompts) and b.stats().num_waiting == 0
    rest = run_to_completion(b)
    assert b.stats().prefill_tokens_total == 0, "the decode engine must not recompute the prompts"
    for i, p in enumerate(models.prompts):
        got = firsts[str(i)].new_token_ids + rest[str(i)]
        assert got == models.reference(p), f"prompt {i}"
        assert got == alone[str(i)], f"prompt {i}"
    assert_all_blocks_free(b)


def test_imports_join_a_decoding_engine_one_by_one(models: Models):
    # The decode engine is busy decoding earlier imports when each new one arrives.
    a = models.engine(policy="nodg", kv_export=True)
    b = models.engine(policy="sarathi", block_size=8)
    for i, p in enumerate(models.prompts):
        a.add_request(str(i), p, greedy())
    firsts = prefill_all(a)
    pending = [str(i) for i in range(len(models.prompts))]

    def arrive(step: int, engine: LLMEngine) -> None:
        if pending and step % 3 == 0:
            rid = pending.pop(0)
            received, _ = over_the_wire(firsts[rid].kv_payload, greedy())
            assert engine.import_request(received, arrival_time=float(step))

    arrive(0, b)
    rest = run_to_completion(b, on_step=lambda s, e: arrive(s + 1, e))
    assert not pending
    for i, p in enumerate(models.prompts):
        assert firsts[str(i)].new_token_ids + rest[str(i)] == models.reference(p), f"prompt {i}"
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=MAX_NEW, temperature=0.9, top_p=0.95, seed=1234),
        SamplingParams(
            max_tokens=MAX_NEW, temperature=1.2, top_k=20, seed=7, repetition_penalty=1.3, min_tokens=5
        ),
    ],
    ids=["top_p", "top_k+penalty+min_tokens"],
)
def test_seeded_sampling_continues_identically(models: Models, params: SamplingParams):
    prompt = models.prompts[2]
    single = models.engine()
    single.add_request("s", prompt, params)
    alone = run_to_completion(single)["s"]
    a = models.engine(kv_export=True)
    b = models.engine(block_size=8)
    a.add_request("s", prompt, params)
    first = prefill_all(a)["s"]
    payload = first.kv_payload
    assert payload is not None and payload.generator_state is not None, "the first token was drawn"
    received, _ = over_the_wire(payload, params)
    assert b.import_request(received, arrival_time=0.0)
    got = first.new_token_ids + run_to_completion(b)["s"]
    assert got == alone
    # The seed matters: without the generator state the continuation differs (the test can fail).
    b2 = models.engine()
    received.generator_state = None
    assert b2.import_request(received, arrival_time=0.0)
    assert first.new_token_ids + run_to_completion(b2)["s"] != alone
    for engine in (a, b, b2, single):
        assert_all_blocks_free(engine)


def test_request_finished_by_its_first_token_is_not_transferred(models: Models):
    prompt = models.prompts[0]
    first_token = models.reference(prompt)[0]
    a = models.engine(eos=set(models.eos) | {first_token}, kv_export=True)
    a.add_request("eos", prompt, greedy())
    a.add_request("one", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    outs = prefill_all(a)
    for rid, reason in (("eos", "stop"), ("one", "length")):
        assert outs[rid].finish_reason == reason and outs[rid].kv_payload is None
        assert outs[rid].new_token_ids == [first_token]
    assert_all_blocks_free(a)


def test_full_decode_pool_recomputes_with_the_same_tokens(models: Models):
    longest = max(models.prompts, key=len)
    a = models.engine(kv_export=True)
    a.add_request("x", longest, greedy())
    a.add_request("y", longest, greedy())
    firsts = prefill_all(a)
    # Room for one sequence only: the second import must fall back to recomputation.
    blocks = -(-(len(longest) + MAX_NEW) // 4) + 1
    b = models.engine(block_size=4, num_kv_blocks=blocks)
    assert b.import_request(over_the_wire(firsts["x"].kv_payload, greedy())[0], arrival_time=0.0)
    assert not b.import_request(over_the_wire(firsts["y"].kv_payload, greedy())[0], arrival_time=0.0)
    assert b.stats().num_waiting == 1
    rest = run_to_completion(b)
    for rid in ("x", "y"):
        assert firsts[rid].new_token_ids + rest[rid] == models.reference(longest), rid
    assert_all_blocks_free(b)


def test_bad_payloads_are_refused_without_allocating(models: Models):
    a = models.engine(kv_export=True)
    a.add_request("r", models.prompts[1], greedy())
    payload = prefill_all(a)["r"].kv_payload
    b = models.engine()
    bad_layout = KvPayload(**{**payload.__dict__, "num_kv_heads": payload.num_kv_heads + 1})
    with pytest.raises(ValueError, match="layout"):
        b.import_request(bad_layout)
    truncated = KvPayload(**{**payload.__dict__, "keys": [k[:-4] for k in payload.keys]})
    with pytest.raises(ValueError, match="keys"):
        b.import_request(truncated)
    bad_params = KvPayload(**{**payload.__dict__, "sampling": {**payload.sampling, "top_p": 2.0}})
    with pytest.raises(ParameterError):
        b.import_request(bad_params)
    assert b.import_request(payload)
    with pytest.raises(ValueError, match="already in use"):
        b.import_request(payload)
    run_to_completion(b)
    assert_all_blocks_free(b)


def test_export_reads_the_pool_slots_of_the_sequence(models: Models):
    # The exported K of layer 0 equals the model's own key projection of the prompt (via a reference run).
    a = models.engine(kv_export=True, block_size=4)
    prompt = models.prompts[1]
    a.add_request("r", prompt, greedy())
    payload = prefill_all(a)["r"].kv_payload
    geometry = a.kv_cache.geometry
    k0 = torch.frombuffer(bytearray(payload.keys[0]), dtype=geometry.dtype)
    k0 = k0.view(len(prompt), geometry.num_kv_heads, geometry.head_dim)
    with torch.inference_mode():
        ref = models.ref(torch.tensor([prompt]), use_cache=True)
    cache = ref.past_key_values
    layer0 = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]
    expected = layer0[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    torch.testing.assert_close(k0, expected, rtol=1e-5, atol=1e-5)


# ---- the chunking of the wire encoding ----


def test_chunks_must_arrive_in_order_and_stale_transfers_are_evicted(models: Models):
    a = models.engine(kv_export=True)
    a.add_request("r", models.prompts[4], greedy())
    payload = prefill_all(a)["r"].kv_payload
    transfer = to_transfer(
        payload,
        dispatch("r", payload.prompt_token_ids, greedy()),
        prefill_instance_id="p",
        decode_instance_id="d",
        next_seq=1,
        queue_time=None,
        first_token_time=None,
        sent_at=0.0,
    )
    pieces = [decode(p, KvChunk) for p in split_transfer(transfer, "t1", CHUNK_BYTES)]
    assert len(pieces) > 2
    assembler = ChunkAssembler(max_pending=2)
    assembler.add(pieces[0])
    with pytest.raises(WireError, match="out of order"):
        assembler.add(pieces[2])  # a lost chunk breaks the transfer…
    assert assembler.num_pending == 0
    with pytest.raises(WireError):
        assembler.add(pieces[-1])  # …so its last chunk is refused too
    # A sender that died mid-transfer leaves a partial one behind: only the newest max_pending are kept.
    for i in range(3):
        assembler.add(replace(pieces[0], transfer_id=f"dead{i}"))
    assert assembler.num_pending == 2
    results = [assembler.add(p) for p in pieces]
    assert results[-1] is not None and results[-1][0] == transfer
    with pytest.raises(ValueError, match="no room"):
        split_transfer(transfer, "t2", CHUNK_OVERHEAD + 10)
