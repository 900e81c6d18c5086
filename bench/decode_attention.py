"""Decode attention per layer: the native paged kernel vs the torch gather fallback vs a contiguous cache.

For SmolLM2-135M-like shapes (9 query heads, 3 KV heads, head_dim 64), every sequence at the same context
length, times one layer's decode attention for:
  native     paged_decode_attention: reads K/V blocks of a shuffled paged pool in place
  gather     paged_decode_attention_torch: gathers the padded context by block table, then one SDPA
  contiguous the baseline, what HF's DynamicCache does each step: torch.cat of the new token onto a
             contiguous [B, KVH, ctx - 1, D] cache, then SDPA with enable_gqa
Each repetition cycles through `--layers` independent pools so that, as in a real model, a layer's KV is not
still in cache from the previous call. The three variants are interleaved per repetition so background load
hits them alike; the table reports medians and the ratio to the contiguous baseline.

    .venv/bin/python bench/decode_attention.py [--json out.json] [--fresh-build]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_config(args: argparse.Namespace, dtype: torch.dtype, batch: int, threads: int) -> dict[str, float]:
    from services.instance.engine.kernels import paged_decode_attention, paged_decode_attention_torch

    torch.set_num_threads(threads)
    heads, kv_heads, head_dim, bs, ctx = args.heads, args.kv_heads, args.head_dim, args.block_size, args.ctx
    gen = torch.Generator().manual_seed(0)
    per_seq = -(-ctx // bs)
    num_blocks = batch * per_seq + 8
    scale = head_dim**-0.5
    pool_shape = (num_blocks, bs, kv_heads, head_dim)
    k_pools = [torch.randn(pool_shape, generator=gen).to(dtype) for _ in range(args.layers)]
    v_pools = [torch.randn(pool_shape, generator=gen).to(dtype) for _ in range(args.layers)]
    # Blocks scattered over the pool, as after a while of allocating and freeing.
    tables = torch.randperm(num_blocks, generator=gen)[: batch * per_seq].view(batch, per_seq).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    query = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    out = torch.empty_like(query)
    cache_shape = (batch, kv_heads, ctx - 1, head_dim)
    k_caches = [torch.randn(cache_shape, generator=gen).to(dtype) for _ in range(args.layers)]
    v_caches = [torch.randn(cache_shape, generator=gen).to(dtype) for _ in range(args.layers)]
    new_k = torch.randn(batch, kv_heads, 1, head_dim, generator=gen).to(dtype)
    new_v = torch.randn(batch, kv_heads, 1, head_dim, generator=gen).to(dtype)
    q4 = query.unsqueeze(2)

    def native(layer: int) -> None:
        paged_decode_attention(query, k_pools[layer], v_pools[layer], tables, lens, scale, out=out)

    def gather(layer: int) -> None:
        paged_decode_attention_torch(query, k_pools[layer], v_pools[layer], tables, lens, scale)

    def contiguous(layer: int) -> None:
        k = torch.cat([k_caches[layer], new_k], dim=2)
        v = torch.cat([v_caches[layer], new_v], dim=2)
        F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    # Sanity: both paged paths agree before anything is timed.
    want = paged_decode_attention_torch(query, k_pools[0], v_pools[0], tables, lens, scale).float()
    got = paged_decode_attention(query, k_pools[0], v_pools[0], tables, lens, scale).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)

    variants: dict[str, Callable[[int], None]] = {
        "native": native,
        "gather": gather,
        "contiguous": contiguous,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.warmup + args.reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            for layer in range(args.layers):
                fn(layer)
            if rep >= args.warmup:
                samples[name].append((time.perf_counter() - start) / args.layers)
    return {f"{name}_ms": median_ms(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ctx", type=int, default=300)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--layers", type=int, default=8, help="independent pools cycled through per repetition"
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--fresh-build", action="store_true", help="build the kernel in a temporary cache dir"
    )
    args = parser.parse_args()

    if args.fresh_build:
        os.environ["ECOSERVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ecoserve-bench-")
    from services.instance.engine.kernels import native_available
    from services.instance.engine.kernels.paged_decode import _LIBRARY

    start = time.perf_counter()
    if not native_available():
        sys.exit("native kernel unavailable: nothing to compare")
    load_s = time.perf_counter() - start

    meta = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "native_flags": list(_LIBRARY.flags or ()),
        "native_build_or_load_s": round(load_s, 3),
        "shape": {
            k: getattr(args, k) for k in ("heads", "kv_heads", "head_dim", "ctx", "block_size", "layers")
        },
        "reps": args.reps,
        "loadavg_before": loadavg(),
    }
    print(f"# {meta['cpu']}, torch {meta['torch']}, native flags {' '.join(meta['native_flags'])}")
    print(f"# native kernel build/load {load_s:.2f} s; load before: {meta['loadavg_before']}")
    header = f"{'thr':>3} {'dtype':>5} {'B':>3} | {'native':>8} {'gather':>8} {'contig':>8} ms | nat/c gat/c"
    print(header)
    print("-" * len(header))
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for dtype_name in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                times = bench_config(args, DTYPES[dtype_name], batch, threads)
                row = {"threads": threads, "dtype": dtype_name, "batch": batch, **times}
                row["native_vs_contiguous"] = times["native_ms"] / times["contiguous_ms"]
                row["gather_vs_contiguous"] = times["gather_ms"] / times["contiguous_ms"]
                rows.append(row)
                ms = " ".join(f"{times[name]:8.3f}" for name in ("native_ms", "gather_ms", "contiguous_ms"))
                ratios = f"{row['native_vs_contiguous']:5.2f} {row['gather_vs_contiguous']:5.2f}"
                print(f"{threads:>3} {dtype_name:>5} {batch:>3} | {ms}    | {ratios}", flush=True)
    meta["loadavg_after"] = loadavg()
    print(f"# load after: {meta['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
