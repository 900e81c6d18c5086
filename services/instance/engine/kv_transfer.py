"""KV export and import between engines: FuDG (DistServe-style full disaggregation).

A prefill engine (`EngineConfig.kv_export`, or `add_request(..., export_kv=True)`) runs a request's prefill,
samples its first token as usual, then hands the request out as a `KvPayload` instead of decoding it: per
layer the K and V of every token that has KV (the prompt), as raw bytes in the cache dtype, plus everything
the sampler needs to continue (prompt, generated tokens, sampling parameters, the seeded generator's state).
Its blocks are freed in the same step. A decode engine `import_payload`s it: allocates blocks, writes the KV
and continues decoding exactly as if it had prefilled the request itself.

The payload is token-major (`[num_tokens, kv_heads, head_dim]` per layer), so the two engines may use
different block sizes. Every token's KV is shipped, also under a sliding window: the pool keeps all
positions and the window is applied by attention, exactly as for a request prefilled locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from services.instance.engine.block_manager import blocks_for_tokens
from services.instance.engine.kv_cache import KVCache
from services.instance.engine.sampling_params import SamplingParams
from services.instance.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from services.instance.engine.llm_engine import LLMEngine

# Cache dtypes a payload may name (by their torch name without the "torch." prefix).
_DTYPES = {
    name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn")
}


@dataclass
class KvPayload:
    """One request's KV and sampler state, in plain Python types and bytes (torch-free to serialize)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (the first token)
    sampling: dict[str, Any]  # SamplingParams.to_dict()
    dtype: str  # cache dtype, e.g. "float32"
    num_layers: int
    num_tokens: int  # tokens with KV: positions [0, num_tokens) of prompt + output
    num_kv_heads: int
    head_dim: int
    keys: list[bytes]  # per layer, [num_tokens, num_kv_heads, head_dim] in `dtype`, C order
    values: list[bytes]
    generator_state: bytes | None = None  # the seeded sampler's torch.Generator state, once it was used
    export_seconds: float = 0.0  # time the prefill engine spent copying the KV out

    @property
    def kv_bytes(self) -> int:
        return sum(len(b) for b in self.keys) + sum(len(b) for b in self.values)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_sequence(kv_cache: KVCache, seq: Sequence) -> KvPayload:
    """Copy `seq`'s cached KV (positions [0, num_computed_tokens)) and sampler state out of the pool."""
    geometry = kv_cache.geometry
    n = seq.num_computed_tokens
    bs = kv_cache.block_size
    device = kv_cache.k[0].device
    table = torch.tensor(seq.block_table, dtype=torch.long, device=device)
    pos = torch.arange(n, dtype=torch.long, device=device)
    slots = table[pos // bs] * bs + pos % bs
    keys: list[bytes] = []
    values: list[bytes] = []
    for layer in range(geometry.num_layers):
        k_pool, v_pool = kv_cache.layer(layer)
        for pool, out in ((k_pool, keys), (v_pool, values)):
            rows = pool.view(-1, geometry.num_kv_heads, geometry.head_dim).index_select(0, slots)
            out.append(_to_bytes(rows))
    state = None if seq.generator is None else _to_bytes(seq.generator.get_state())
    return KvPayload(
        request_id=seq.request_id,
        prompt_token_ids=list(seq.prompt_token_ids),
        output_token_ids=list(seq.output_token_ids),
        sampling=seq.params.to_dict(),
        dtype=dtype_name(geometry.dtype),
        num_layers=geometry.num_layers,
        num_tokens=n,
        num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        keys=keys,
        values=values,
        generator_state=state,
    )


def import_payload(
    engine: LLMEngine,
    payload: KvPayload,
    *,
    arrival_time: float,
    first_token_time: float | None = None,
) -> bool:
    """Continue `payload`'s request in `engine` (call it in the engine's thread, between steps).

    True when its KV was written into the pool and it decodes at the next step. False when the pool (or
    `max_num_seqs`) had no room: the KV is dropped and the request waits to be recomputed, like a
    preempted one, which yields the same tokens. Raises ValueError (ParameterError for a bad parameter)
    when the payload cannot continue here; nothing is allocated then.
    """
    params = check_import(engine, payload)
    seq = Sequence(
        request_id=payload.request_id,
        prompt_token_ids=list(payload.prompt_token_ids),
        params=params,
        arrival_time=arrival_time,
        eos_token_ids=engine.eos_token_ids,
        output_token_ids=list(payload.output_token_ids),
    )
    # Timestamps of the prefill (in this engine's clock) so outputs report the request's real TTFT.
    seq.first_scheduled_time = arrival_time
    seq.first_token_time = arrival_time if first_token_time is None else first_token_time
    device = engine.kv_cache.k[0].device
    if payload.generator_state is not None:
        seq.generator = torch.Generator(device=device)
        seq.generator.set_state(_from_bytes(payload.generator_state, torch.uint8, (-1,), torch.device("cpu")))
    scheduler, blocks = engine.scheduler, engine.blocks
    n = payload.num_tokens
    fits = (
        blocks.can_allocate(blocks_for_tokens(n, blocks.block_size))
        and len(scheduler.running) < scheduler.config.max_num_seqs
    )
    engine.register_request_id(seq.request_id)
    if not fits:
        # Like a sequence preempted on arrival: it lost its KV, so it is recomputed when there is room (and
        # policies resume preempted sequences first, e.g. padg with a closed window).
        seq.num_preemptions = 1
        scheduler.add(seq)
        return False
    blocks.allocate(seq, n)
    _write_kv(engine.kv_cache, seq, payload, device)
    seq.num_computed_tokens = n
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)
    return True


def check_import(engine: LLMEngine, payload: KvPayload) -> SamplingParams:
    """The payload's sampling parameters if `engine` can continue it, else ValueError (ParameterError for a
    bad parameter). Read-only: a frontend thread may call it first, as it calls `validate_request`."""
    params = SamplingParams.from_dict(dict(payload.sampling))
    geometry = engine.kv_cache.geometry
    ours = (dtype_name(geometry.dtype), geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    theirs = (payload.dtype, payload.num_layers, payload.num_kv_heads, payload.head_dim)
    if ours != theirs:
        raise ValueError(f"KV layout (dtype, layers, kv heads, head dim) {theirs} does not match ours {ours}")
    engine.validate_request(payload.request_id, payload.prompt_token_ids, params)
    outputs = payload.output_token_ids
    if not outputs or any(not 0 <= t < engine.vocab_size for t in outputs):
        raise ValueError("a transferred request needs its generated tokens, each in the vocabulary")
    if len(outputs) >= params.max_tokens:
        raise ValueError(f"the request already has its {params.max_tokens} tokens")
    total = len(payload.prompt_token_ids) + len(outputs)
    if payload.num_tokens != total - 1:
        raise ValueError(f"KV for {payload.num_tokens} tokens; a request of {total} tokens needs {total - 1}")
    if total >= engine.max_model_len:
        raise ValueError(f"{total} tokens leave no room in this engine's context of {engine.max_model_len}")
    expected = payload.num_tokens * payload.num_kv_heads * payload.head_dim * _element_size(payload.dtype)
    for name, layers in (("keys", payload.keys), ("values", payload.values)):
        if len(layers) != payload.num_layers or any(len(b) != expected for b in layers):
            raise ValueError(f"{name}: need {payload.num_layers} layers of {expected} bytes each")
    return params


def _write_kv(kv_cache: KVCache, seq: Sequence, payload: KvPayload, device: torch.device) -> None:
    bs = kv_cache.block_size
    dtype = kv_cache.geometry.dtype
    shape = (payload.num_tokens, payload.num_kv_heads, payload.head_dim)
    table = torch.tensor(seq.block_table, dtype=torch.long, device=device)
    pos = torch.arange(payload.num_tokens, dtype=torch.long, device=device)
    slots = table[pos // bs] * bs + pos % bs
    for layer in range(payload.num_layers):
        k_pool, v_pool = kv_cache.layer(layer)
        for pool, data in ((k_pool, payload.keys[layer]), (v_pool, payload.values[layer])):
            flat = pool.view(-1, payload.num_kv_heads, payload.head_dim)
            flat.index_copy_(0, slots, _from_bytes(data, dtype, shape, device))


def _to_bytes(t: torch.Tensor) -> bytes:
    # Through uint8 so every dtype (bfloat16 included, which numpy lacks) serializes the same way.
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _from_bytes(
    data: bytes, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    # bytearray: torch.frombuffer wants a writable buffer; the copy is the price of no warning.
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape).to(device)


def _element_size(dtype: str) -> int:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype!r}")
    return torch.empty((), dtype=_DTYPES[dtype]).element_size()
