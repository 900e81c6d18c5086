"""Paged attention, plugged into unmodified transformers model code through `AttentionInterface`.

The model is called with one packed sequence `[1, T]` holding every scheduled chunk: first the chunks of
one token (decodes, or a last prompt token), then the longer ones. For each layer this function writes the
chunk's new K/V into the pool, then attends:
- one-token chunks together, reading their context from the pool in place (`kernels.paged_decode_attention`);
- each longer chunk with SDPA: causal on its own K/V when it starts at position 0, otherwise on its context
  gathered from the pool with a bottom-right-aligned causal mask (SDPA's `is_causal` is top-left aligned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from services.instance.engine.kernels import paged_decode_attention
from services.instance.engine.kv_cache import KVCache

ATTENTION_NAME = "ecoserve_paged"
META_KWARG = "paged_meta"


@dataclass
class PrefillSpan:
    """A chunk of more than one token: query rows [q_start, q_start + q_len) attending to kv positions
    [0, kv_len) of its sequence; `kv_slots` (pool slots of those positions) is None when kv_len == q_len."""

    q_start: int
    q_len: int
    kv_len: int
    kv_slots: torch.Tensor | None


@dataclass
class PagedMetadata:
    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] pool slot of every packed token
    num_decodes: int  # the first num_decodes packed tokens are one-token chunks
    decode_block_tables: torch.Tensor  # int32 [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # int32 [num_decodes]
    prefills: list[PrefillSpan]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta: PagedMetadata | None = kwargs.get(META_KWARG)
    if meta is None:
        # Without it the model would silently attend to nothing it cached: fail loudly instead.
        raise RuntimeError(f"{ATTENTION_NAME} attention called without the {META_KWARG!r} kwarg")
    if query.shape[0] != 1:
        raise RuntimeError(f"{ATTENTION_NAME} expects one packed sequence, got batch {query.shape[0]}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = sliding_window if sliding_window and sliding_window > 0 else None
    k_pool, v_pool = meta.kv_cache.layer(module.layer_idx)
    num_tokens, num_heads, head_dim = query.shape[2], query.shape[1], query.shape[3]
    kv_heads = key.shape[1]

    flat_k = k_pool.view(-1, kv_heads, head_dim)
    flat_v = v_pool.view(-1, kv_heads, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_pool.dtype))
    flat_v.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_pool.dtype))

    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    nd = meta.num_decodes
    if nd:
        q = query[0, :, :nd, :].transpose(0, 1).to(k_pool.dtype).contiguous()
        dec = paged_decode_attention(
            q, k_pool, v_pool, meta.decode_block_tables, meta.decode_context_lens, scale, window
        )
        out[:nd] = dec.to(out.dtype)
    for span in meta.prefills:
        rows = slice(span.q_start, span.q_start + span.q_len)
        q = query[:, :, rows, :]
        if span.kv_slots is None:
            k, v = key[:, :, rows, :], value[:, :, rows, :]
        else:
            k = flat_k.index_select(0, span.kv_slots).transpose(0, 1).unsqueeze(0).to(query.dtype)
            v = flat_v.index_select(0, span.kv_slots).transpose(0, 1).unsqueeze(0).to(query.dtype)
        if span.kv_slots is None and window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = causal_mask(span.q_len, span.kv_len, window, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean `[q_len, kv_len]` mask, True where attention is allowed: query row r sits at absolute
    position kv_len - q_len + r and sees kv position j when j <= that position (and, with a sliding window
    W, position - j < W — transformers' convention)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    kv_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    allowed = kv_pos <= q_pos
    if window is not None:
        allowed &= q_pos - kv_pos < window
    return allowed


AttentionInterface.register(ATTENTION_NAME, paged_attention)
