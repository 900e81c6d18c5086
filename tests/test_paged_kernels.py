"""Paged decode attention (native kernel and torch fallback) against contiguous float64 attention."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from services.instance.engine.kernels import (
    native_available,
    paged_decode_attention,
    paged_decode_attention_torch,
)
from services.instance.engine.kernels.native import NativeLibrary, build_library, native_disabled

Impl = Callable[..., torch.Tensor]
Case = tuple[torch.Tensor, ...]  # query, k_pool, v_pool, block_tables, context_lens
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["native", "torch"])
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "torch":
        return paged_decode_attention_torch
    if native_disabled() or shutil.which("gcc") is None:
        pytest.skip("native kernels disabled or no compiler")
    assert native_available(), "gcc is present but the native kernel did not build"
    return paged_decode_attention


def make_case(
    lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    seed: int = 0,
) -> Case:
    """Random pools with each sequence's blocks scattered (shuffled ids) and padded tables of -1."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    max_blocks = max(per_seq) + 1  # one always-unused column, so padding is exercised
    num_blocks = sum(per_seq) + 7  # spare blocks that nobody uses
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_pool = torch.randn(shape, generator=gen).to(dtype)
    v_pool = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for seq, count in enumerate(per_seq):
        tables[seq, :count] = ids[used : used + count]
        used += count
    return query, k_pool, v_pool, tables, torch.tensor(lens, dtype=torch.int32)


def reference(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Per sequence: its context copied out contiguously, repeated per query head, softmax in float64."""
    block_size = k_pool.shape[1]
    group = query.shape[1] // k_pool.shape[2]
    rows = []
    for seq in range(query.shape[0]):
        n = int(lens[seq])
        pos = torch.arange(n)
        blocks = tables[seq, pos // block_size].long()
        k = k_pool[blocks, pos % block_size].double()  # [n, KVH, D]
        v = v_pool[blocks, pos % block_size].double()
        if window:
            k, v = k[max(0, n - window) :], v[max(0, n - window) :]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, n, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.einsum("hd,hnd->hn", query[seq].double(), k) * scale
        rows.append(torch.einsum("hn,hnd->hd", scores.softmax(-1), v))
    return torch.stack(rows)


def check(impl: Impl, case: Case, window: int | None, dtype: torch.dtype) -> None:
    query = case[0]
    scale = query.shape[-1] ** -0.5
    got = impl(*case, scale, window)
    assert got.shape == query.shape and got.dtype == dtype
    want = reference(*case, scale, window)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


# Ragged: 1 token, exact multiples of the block size, one past, and long.
RAGGED = [1, 16, 17, 32, 300, 2, 15, 48, 100, 64, 33, 257, 5, 160, 31, 80, 1, 200, 47, 16, 96, 9, 129, 250, 3,
          144, 63, 12, 208, 65, 1, 112, 77, 240, 18, 45, 301]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 4), (9, 3)])
@pytest.mark.parametrize("lens", [[77], RAGGED], ids=["B1", "B37"])
@pytest.mark.parametrize("window", [None, 24])
def test_matches_reference(
    impl: Impl,
    dtype: torch.dtype,
    head_dim: int,
    heads: int,
    kv_heads: int,
    lens: list[int],
    window: int | None,
) -> None:
    assert len(RAGGED) == 37
    check(impl, make_case(lens, heads, kv_heads, head_dim, dtype), window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "block_size"), [(40, 5), (80, 1), (96, 32), (64, 7)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (10, 2)])
def test_other_shapes(
    impl: Impl, dtype: torch.dtype, head_dim: int, block_size: int, heads: int, kv_heads: int
) -> None:
    """Head dims off the specialised paths, block sizes that don't match the kernel's 16-row tiles, and a
    query group larger than the kernel's 4-head register blocks."""
    case = make_case([1, 7, 35, 70, 64], heads, kv_heads, head_dim, dtype, block_size=block_size, seed=1)
    check(impl, case, None, dtype)
    check(impl, case, 10, dtype)


def test_window_edges(impl: Impl) -> None:
    """A window of 1 sees only the query's own position; one at least the context sees everything."""
    case = make_case([1, 16, 40], 4, 2, 64, torch.float32)
    check(impl, case, 1, torch.float32)
    full = impl(*case, 0.125, None)
    torch.testing.assert_close(impl(*case, 0.125, 40), full)
    torch.testing.assert_close(impl(*case, 0.125, 0), full)


def test_out_is_written(impl: Impl) -> None:
    case = make_case([20, 3], 4, 2, 64, torch.float32)
    out = torch.full_like(case[0], float("nan"))
    result = impl(*case, 0.125, None, out=out)
    assert result is out
    torch.testing.assert_close(out.double(), reference(*case, 0.125, None), atol=1e-5, rtol=1e-5)


def test_large_scores_are_stable(impl: Impl) -> None:
    """Scores in the thousands overflow a naive exp; max-subtraction keeps them finite."""
    query, k_pool, v_pool, tables, lens = make_case([50, 300], 4, 2, 64, torch.float32)
    case = (query * 4, k_pool * 4, v_pool, tables, lens)  # scores up to ~500: exp overflows fp32 at 88
    got = impl(*case, 1.0, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference(*case, 1.0, None), atol=1e-3, rtol=1e-3)


def test_native_equals_torch_fallback(impl: Impl) -> None:
    case = make_case(RAGGED, 9, 3, 64, torch.float32, seed=3)
    torch.testing.assert_close(impl(*case, 0.125, 50), paged_decode_attention_torch(*case, 0.125, 50))


def test_empty_batch(impl: Impl) -> None:
    query, k_pool, v_pool, _, _ = make_case([4], 4, 2, 64, torch.float32)
    empty_tables = torch.zeros(0, 3, dtype=torch.int32)
    got = impl(query[:0], k_pool, v_pool, empty_tables, torch.zeros(0, dtype=torch.int32), 0.125)
    assert got.shape == (0, 4, 64)


def _invalid_cases() -> dict[str, Callable[[Case], Case]]:
    def with_(index: int, value: torch.Tensor) -> Callable[[Case], Case]:
        return lambda c: (*c[:index], value, *c[index + 1 :])

    def set_entry(index: int, row: int, col: int | None, value: int) -> Callable[[Case], Case]:
        def edit(c: Case) -> Case:
            tensor = c[index].clone()
            if col is None:
                tensor[row] = value
            else:
                tensor[row, col] = value
            return (*c[:index], tensor, *c[index + 1 :])

        return edit

    return {
        "query_2d": lambda c: (c[0][:, 0], *c[1:]),
        "pool_3d": lambda c: (c[0], c[1][0], c[2][0], *c[3:]),
        "pool_shapes_differ": lambda c: (c[0], c[1], c[2][:-1], *c[3:]),
        "head_dim_mismatch": lambda c: (c[0][..., :32].contiguous(), *c[1:]),
        "heads_not_multiple": lambda c: (c[0][:, :3].contiguous(), *c[1:]),
        "dtype_mismatch": lambda c: (c[0].to(torch.bfloat16), *c[1:]),
        "unsupported_dtype": lambda c: (c[0].double(), c[1].double(), c[2].double(), *c[3:]),
        "int64_tables": lambda c: (*c[:3], c[3].long(), c[4]),
        "int64_lens": lambda c: (*c[:4], c[4].long()),
        "tables_batch": lambda c: (*c[:3], c[3][:1].contiguous(), c[4]),
        "lens_batch": lambda c: (*c[:4], c[4][:1].contiguous()),
        "noncontiguous_query": lambda c: (c[0].transpose(0, 1).contiguous().transpose(0, 1), *c[1:]),
        "noncontiguous_tables": with_(3, torch.zeros(4, 2, dtype=torch.int32).t()),
        "zero_context": set_entry(4, 1, None, 0),
        "context_beyond_table": lambda c: (
            *c[:4],
            torch.tensor([20, c[3].shape[1] * 16 + 1], dtype=torch.int32),
        ),
        "block_id_negative": set_entry(3, 1, 0, -1),
        "block_id_too_large": set_entry(3, 0, 1, 10_000),
    }


@pytest.mark.parametrize("name", list(_invalid_cases()))
def test_invalid_inputs_raise(impl: Impl, name: str) -> None:
    case = _invalid_cases()[name](make_case([20, 3], 4, 2, 64, torch.float32))
    with pytest.raises(ValueError):
        impl(*case, 0.125)


def test_invalid_out_raises(impl: Impl) -> None:
    case = make_case([20, 3], 4, 2, 64, torch.float32)
    for bad in (
        torch.empty(2, 4, 32),
        torch.empty(2, 4, 64, dtype=torch.bfloat16),
        torch.empty(4, 2, 64).transpose(0, 1),
    ):
        with pytest.raises(ValueError):
            impl(*case, 0.125, out=bad)


def test_unused_table_entries_are_ignored(impl: Impl) -> None:
    """Entries past a sequence's last block may hold anything (padding), even out-of-range ids."""
    query, k_pool, v_pool, tables, lens = make_case([20, 3], 4, 2, 64, torch.float32)
    tables[1, 1:] = 10_000
    check(impl, (query, k_pool, v_pool, tables, lens), None, torch.float32)


def test_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECOSERVE_NATIVE_KERNELS", "0")
    assert not native_available()
    case = make_case([20, 3], 4, 2, 64, torch.float32)
    torch.testing.assert_close(paged_decode_attention(*case, 0.125).double(), reference(*case, 0.125, None))


# ---------------------------------------------------------------- building and caching the library


TINY_SOURCE = "int answer(void) { return 42; }\n"


def _declare_answer(library: ctypes.CDLL) -> None:
    library.answer.restype = ctypes.c_int


@pytest.fixture
def tiny_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no compiler")
    monkeypatch.setenv("ECOSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ECOSERVE_NATIVE_KERNELS", raising=False)
    source = tmp_path / "answer.c"
    source.write_text(TINY_SOURCE)
    return source


def test_build_is_cached(tiny_source: Path, tmp_path: Path) -> None:
    path, flags = build_library(tiny_source)
    assert path.parent == tmp_path / "cache" / "kernels" and path.suffix == ".so"
    assert flags[0] == "-O3"
    stamp = path.stat().st_mtime_ns
    assert build_library(tiny_source) == (path, flags)
    assert path.stat().st_mtime_ns == stamp  # not rebuilt
    tiny_source.write_text(TINY_SOURCE + "int other(void) { return 1; }\n")
    assert build_library(tiny_source)[0] != path  # keyed by content


def test_concurrent_builds_publish_one_library(tiny_source: Path, tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_library(tiny_source)[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "kernels").iterdir()) == [results[0].name]
    assert ctypes.CDLL(str(results[0])).answer() == 42


def test_missing_compiler_warns_once(tiny_source: Path) -> None:
    library = NativeLibrary(tiny_source, _declare_answer, compiler=["/nonexistent/cc"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert library.get() is None
        assert library.get() is None
    assert len(caught) == 1 and "torch fallback" in str(caught[0].message)


def test_native_library_loads(tiny_source: Path) -> None:
    library = NativeLibrary(tiny_source, _declare_answer)
    loaded = library.get()
    assert loaded is not None and loaded.answer() == 42
    assert library.get() is loaded


@pytest.mark.parametrize("lens", [[77], [5, 300, 17]], ids=["B1", "B3"])
def test_kv_heads_split_across_threads(impl: Impl, lens: list[int]) -> None:
    """With few sequences per thread the native kernel splits a sequence's kv heads across work items;
    that path only runs with more than one thread, so this one test uses two (on tiny inputs)."""
    case = make_case(lens, 12, 4, 64, torch.bfloat16, seed=4)
    torch.set_num_threads(2)
    try:
        check(impl, case, None, torch.bfloat16)
        check(impl, case, 30, torch.bfloat16)
    finally:
        torch.set_num_threads(1)


def test_stale_libraries_of_the_same_source_are_pruned(tiny_source: Path, tmp_path: Path) -> None:
    kernels = tmp_path / "cache" / "kernels"
    kernels.mkdir(parents=True)
    month_ago = time.time() - 31 * 24 * 3600
    stale = [kernels / f"answer-{'a' * 32}.so", kernels / f"{'b' * 32}.so"]  # an older build; the old naming
    kept = [
        kernels / f"answer-{'c' * 32}.so",  # used recently (another CPU sharing the cache, say)
        kernels / f"paged_decode-{'d' * 32}.so",  # another kernel's
        kernels / "notes.txt",
    ]
    for path in [*stale, *kept]:
        path.write_bytes(b"")
    for path in [*stale, kept[1]]:
        os.utime(path, (month_ago, month_ago))
    path, _ = build_library(tiny_source)
    assert path.name.startswith("answer-")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and path.exists()
