"""Decode attention over a paged KV pool: each sequence's single query token attends to its cached context.

Two implementations with one signature:
- `paged_decode_attention`: the native kernel (`paged_decode.c`) reading K/V blocks in place on CPU; it
  falls back to the torch path for non-CPU tensors, when the kernel can't be built, or when
  `ECOSERVE_NATIVE_KERNELS=0`.
- `paged_decode_attention_torch`: gathers the padded context by block table, then one batched SDPA with a
  length mask (device generic).

Shapes: query/out `[B, H, D]`; pools `[num_blocks, block_size, KVH, D]`; block_tables int32
`[B, max_blocks_per_seq]` (entries past a sequence's last block are ignored); context_lens int32 `[B]`.
Query head h uses kv head h // (H / KVH). With `sliding_window` W, the query (at position context_len - 1)
sees the last W positions only, as in transformers.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from services.instance.engine.kernels.native import NativeLibrary

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERR_CONTEXT_LEN, _ERR_BLOCK_ID, _ERR_NO_MEMORY = 1, 2, 3


class _Geometry(NamedTuple):
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int


def _declare(library: ctypes.CDLL) -> None:
    fn = library.paged_decode_attention
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [
        *(ptr,) * 6,  # q, k_pool, v_pool, block_tables, context_lens, out
        *(i64,) * 7,  # B, H, KVH, D, block_size, max_blocks_per_seq, num_blocks
        ctypes.c_float,  # scale
        i64,  # sliding_window
        ctypes.c_int,  # dtype code
        ctypes.c_int,  # threads
        ctypes.POINTER(i64),  # out: offending sequence on error
    ]
    fn.restype = ctypes.c_int


_LIBRARY = NativeLibrary(Path(__file__).with_name("paged_decode.c"), _declare)


def native_available() -> bool:
    """Whether the native kernel is built and enabled (builds it on first call)."""
    return _LIBRARY.get() is not None


def paged_decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    geo = _validate(query, k_pool, v_pool, block_tables, context_lens, out)
    library = _LIBRARY.get() if query.device.type == "cpu" else None
    if library is None:
        return _attend_torch(
            query, k_pool, v_pool, block_tables, context_lens, scale, sliding_window, out, geo
        )
    if out is None:
        out = torch.empty_like(query)
    if geo.batch == 0:
        return out
    bad_seq = ctypes.c_int64(-1)
    status = library.paged_decode_attention(
        query.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        geo.batch,
        geo.heads,
        geo.kv_heads,
        geo.head_dim,
        geo.block_size,
        geo.max_blocks,
        geo.num_blocks,
        scale,
        sliding_window or 0,
        DTYPE_CODES[query.dtype],
        torch.get_num_threads(),
        ctypes.byref(bad_seq),
    )
    if status == _ERR_CONTEXT_LEN:
        raise ValueError(_context_len_error(int(context_lens[bad_seq.value]), bad_seq.value, geo))
    if status == _ERR_BLOCK_ID:
        raise ValueError(_block_id_error(bad_seq.value, geo))
    if status == _ERR_NO_MEMORY:
        raise MemoryError("paged_decode_attention: out of memory for its workspace")
    if status != 0:
        raise RuntimeError(f"paged_decode_attention: native kernel returned {status}")
    return out


def paged_decode_attention_torch(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    geo = _validate(query, k_pool, v_pool, block_tables, context_lens, out)
    return _attend_torch(query, k_pool, v_pool, block_tables, context_lens, scale, sliding_window, out, geo)


def _attend_torch(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None,
    geo: _Geometry,
) -> torch.Tensor:
    if geo.batch == 0:
        return out if out is not None else torch.empty_like(query)
    device = query.device
    lens = context_lens.long()
    bs = geo.block_size
    used = torch.arange(geo.max_blocks, device=device)[None, :] < ((lens + bs - 1) // bs)[:, None]
    bad_block = used & ((block_tables < 0) | (block_tables >= geo.num_blocks))
    # One host sync for every check, and for the padded length.
    shortest, longest, any_bad = torch.stack([lens.min(), lens.max(), bad_block.any().long()]).tolist()
    if shortest < 1 or longest > geo.max_blocks * bs:
        seq = int(((lens < 1) | (lens > geo.max_blocks * bs)).nonzero()[0, 0])
        raise ValueError(_context_len_error(int(lens[seq]), seq, geo))
    if any_bad:
        raise ValueError(_block_id_error(int(bad_block.any(dim=1).nonzero()[0, 0]), geo))

    num_blocks = -(-longest // bs)
    table = torch.where(used[:, :num_blocks], block_tables[:, :num_blocks], 0).long()
    padded = num_blocks * bs
    shape = (geo.batch, padded, geo.kv_heads, geo.head_dim)
    k = k_pool[table].view(shape).transpose(1, 2)  # [B, KVH, padded, D]
    v = v_pool[table].view(shape).transpose(1, 2)
    positions = torch.arange(padded, device=device)[None, :]
    mask = positions < lens[:, None]
    if sliding_window is not None and sliding_window > 0:
        mask &= positions > (lens - 1 - sliding_window)[:, None]
    attended = F.scaled_dot_product_attention(
        query.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    ).squeeze(2)
    if out is None:
        return attended
    out.copy_(attended)
    return out


def _validate(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> _Geometry:
    if query.dim() != 3:
        raise ValueError(f"query must be [B, H, D], got shape {tuple(query.shape)}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            "k_pool and v_pool must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, pool_head_dim = k_pool.shape
    if pool_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != pool head_dim {pool_head_dim}")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    if query.dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported dtype {query.dtype}; expected one of {list(DTYPE_CODES)}")
    if k_pool.dtype != query.dtype or v_pool.dtype != query.dtype:
        raise ValueError(f"dtype mismatch: query {query.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks], got {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got {tuple(context_lens.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(
            f"block_tables and context_lens must be int32, got {block_tables.dtype} and {context_lens.dtype}"
        )
    tensors = {"query": query, "k_pool": k_pool, "v_pool": v_pool}
    tensors |= {"block_tables": block_tables, "context_lens": context_lens}
    if out is not None:
        if out.shape != query.shape or out.dtype != query.dtype:
            raise ValueError(
                f"out must match query ({tuple(query.shape)}, {query.dtype}), "
                f"got ({tuple(out.shape)}, {out.dtype})"
            )
        tensors["out"] = out
    for name, tensor in tensors.items():
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, query on {query.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return _Geometry(batch, heads, kv_heads, head_dim, num_blocks, block_size, block_tables.shape[1])


def _context_len_error(length: int, seq: int, geo: _Geometry) -> str:
    limit = geo.max_blocks * geo.block_size
    return f"context_lens[{seq}] = {length} is outside [1, {limit}] (max_blocks_per_seq * block_size)"


def _block_id_error(seq: int, geo: _Geometry) -> str:
    return f"block_tables[{seq}] holds a block id outside [0, {geo.num_blocks}) among the blocks it uses"
