"""Sampler semantics (vLLM's): penalties, min_tokens, greedy / top_k / top_p / min_p, seeds, logprobs."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from services.instance.engine.sampler import (
    Sampler,
    apply_top_k_top_p,
    benchmark,
    fast_argmax,
    is_greedy,
)
from services.instance.engine.sampling_params import SamplingParams
from services.instance.engine.sequence import Sequence

torch.set_num_threads(1)

EOS = 9


def seq(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset({EOS}),
    rid: str = "r",
    **params: Any,
) -> Sequence:
    return Sequence(
        rid,
        [1, 2, 3] if prompt is None else prompt,
        SamplingParams(**params).validate(),
        eos_token_ids=eos,
        output_token_ids=[] if output is None else list(output),
    )


def draws(logits_row: torch.Tensor, n: int, **params: Any) -> list[int]:
    """n unseeded draws for one distribution, as one batch of n identical rows."""
    return Sampler()(logits_row.expand(n, -1).contiguous(), [seq(**params) for _ in range(n)]).token_ids


# --- greedy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [7, 1024, 2048, 2500, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_argmax_matches_torch_argmax(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=gen).to(dtype)
    x[1, -1] = 100  # maximum in the (possibly short) tail chunk
    x[2, 0] = 100  # maximum in the first column
    x[3, vocab // 3] = x[3, vocab - 1] = 100  # tie across chunks: the first index wins
    x[4] = float("-inf")  # every column equal
    x[5, :] = 0.5  # all tied
    assert fast_argmax(x).tolist() == x.argmax(-1).tolist()
    assert fast_argmax(x[:, :].T.contiguous().T).tolist() == x.argmax(-1).tolist()  # non-contiguous input


def test_greedy_equals_argmax_and_input_is_untouched() -> None:
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    out = Sampler()(logits, [seq(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy_under_random_logits() -> None:
    gen = torch.Generator().manual_seed(2)
    sampler = Sampler()
    for trial in range(20):
        logits = torch.randn(8, 500, generator=gen) * (1 + trial)
        history = torch.randint(0, 500, (8, 30), generator=gen).tolist()
        temps = (torch.rand(8, generator=gen) * 2 + 0.1).tolist()
        pen: dict[str, Any] = {"repetition_penalty": 1.3, "frequency_penalty": 0.4} if trial % 2 else {}
        greedy = [seq(h[:20], h[20:], temperature=0.0, **pen) for h in history]
        top1 = [
            seq(h[:20], h[20:], temperature=t, top_k=1, top_p=0.5, **pen)
            for h, t in zip(history, temps, strict=True)
        ]
        expected = sampler(logits, greedy).token_ids
        assert sampler(logits, top1).token_ids == expected
        # Also when the batch is mixed with sampled rows (the non-fast path).
        mixed = sampler(torch.cat([logits, logits]), top1 + [seq(temperature=1.0) for _ in range(8)])
        assert mixed.token_ids[:8] == expected


def test_near_zero_temperature_is_greedy() -> None:
    assert is_greedy(SamplingParams(temperature=1e-7))
    assert is_greedy(SamplingParams(temperature=0.7, top_k=1))
    assert not is_greedy(SamplingParams(temperature=0.7))
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(3)) * 50
    assert (
        Sampler()(logits, [seq(temperature=1e-7) for _ in range(3)]).token_ids == logits.argmax(-1).tolist()
    )


# --- sampling distribution and support ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0])
    n = 20000
    counts = Counter(draws(logits, n, temperature=temperature))
    expected = torch.softmax(logits / temperature, -1).tolist()
    for token, p in enumerate(expected):
        # Binomial std is below 0.0036 here; 0.015 is > 4 std.
        assert abs(counts[token] / n - p) < 0.015, (token, counts, expected)


def test_seeded_generator_advances_and_follows_the_distribution() -> None:
    logits = torch.tensor([[0.5, 0.0, -0.5]])
    s = seq(temperature=1.0, seed=42)
    sampler = Sampler()
    tokens = []
    for _ in range(2000):
        tokens.append(sampler(logits, [s]).token_ids[0])
        s.output_token_ids.append(tokens[-1])
    assert isinstance(s.generator, torch.Generator)
    counts = Counter(tokens)
    for token, p in enumerate(torch.softmax(logits[0], -1).tolist()):
        assert abs(counts[token] / 2000 - p) < 0.05, counts


PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 2}, {0: 0.4 / 0.7, 1: 0.3 / 0.7}),
        ({"top_k": 3}, {0: 0.4 / 0.9, 1: 0.3 / 0.9, 2: 0.2 / 0.9}),
        ({"top_p": 0.6}, {0: 0.4 / 0.7, 1: 0.3 / 0.7}),
        ({"top_p": 0.75}, {0: 0.4 / 0.9, 1: 0.3 / 0.9, 2: 0.2 / 0.9}),
        ({"top_p": 0.8}, {0: 0.4 / 0.9, 1: 0.3 / 0.9, 2: 0.2 / 0.9}),
        # Temperature first: at T=0.5 the probs are [.533, .3, .133, .033], so 0.8 needs two tokens.
        ({"top_p": 0.8, "temperature": 0.5}, {0: 0.16 / 0.25, 1: 0.09 / 0.25}),
        # top_p sees the top_k survivors renormalised: [.571, .429] reaches 0.55 with one token.
        ({"top_k": 2, "top_p": 0.55}, {0: 1.0}),
        ({"min_p": 0.3}, {0: 0.4 / 0.9, 1: 0.3 / 0.9, 2: 0.2 / 0.9}),
        ({"min_p": 0.6}, {0: 0.4 / 0.7, 1: 0.3 / 0.7}),
        ({"top_p": 0.75, "min_p": 0.6}, {0: 0.4 / 0.7, 1: 0.3 / 0.7}),
        ({"top_k": -1, "top_p": 1.0, "min_p": 0.0}, {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1}),
    ],
)
def test_filters_restrict_support_and_renormalise(params: dict[str, Any], allowed: dict[int, float]) -> None:
    torch.manual_seed(1)
    n = 4000
    counts = Counter(draws(PROBS.log(), n, **params))
    assert set(counts) == set(allowed), counts
    for token, p in allowed.items():
        assert abs(counts[token] / n - p) < 0.035, (token, counts, allowed)


def _nucleus_reference(row: torch.Tensor, top_p: float) -> set[int]:
    probs = torch.softmax(row.double(), -1)
    order = probs.argsort(descending=True)
    mass, keep = 0.0, set()
    for t in order.tolist():
        keep.add(t)
        mass += probs[t].item()
        if mass >= top_p:
            break
    return keep


@pytest.mark.parametrize("scale", [0.5, 6.0])  # flat: nucleus wider than the candidates; peaked: within
def test_top_p_large_vocab_matches_reference_nucleus(scale: float) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3000, generator=gen) * scale
    ps = [0.3, 0.5, 0.8, 0.9, 0.95, 1.0]
    masked = x.clone()
    apply_top_k_top_p(masked, [0] * 6, ps)
    for i, p in enumerate(ps):
        kept = set(torch.isfinite(masked[i]).nonzero().squeeze(1).tolist())
        assert kept == (set(range(3000)) if p == 1.0 else _nucleus_reference(x[i], p))
    # Sampling through the Sampler never leaves the nucleus.
    torch.manual_seed(5)
    tokens = draws(x[3], 500, top_p=0.9)
    assert set(tokens) <= _nucleus_reference(x[3], 0.9)


def test_top_k_per_row_keeps_exactly_k_and_ties() -> None:
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(6))
    x[2, :5] = 50.0  # five-way tie at the top: top_k=3 keeps all five, as vLLM does
    masked = x.clone()
    apply_top_k_top_p(masked, [3, 0, 3], [1.0, 1.0, 1.0])
    assert set(torch.isfinite(masked[0]).nonzero().squeeze(1).tolist()) == set(x[0].topk(3).indices.tolist())
    assert torch.isfinite(masked[1]).all()
    assert set(torch.isfinite(masked[2]).nonzero().squeeze(1).tolist()) == {0, 1, 2, 3, 4}


# --- seeds --------------------------------------------------------------------------------------------------

SEEDED_VARIANTS = [
    {"temperature": 0.9, "seed": 1234},
    {"temperature": 0.9, "top_p": 0.9, "seed": 1234},  # flat logits: full-sort nucleus
    {"temperature": 1.1, "top_k": 40, "top_p": 0.8, "min_p": 0.02, "seed": 77, "repetition_penalty": 1.2},
]


def _run_steps(
    rows: list[Sequence], target: int, steps: list[torch.Tensor], others: torch.Tensor
) -> list[int]:
    """Decode len(steps) steps; row `target` gets steps[i], the other rows get rows of `others`."""
    sampler = Sampler()
    tokens = []
    for i, step in enumerate(steps):
        logits = others[i, : len(rows)].clone()
        logits[target] = step
        out = sampler(logits, rows).token_ids
        for r, t in zip(rows, out, strict=True):
            r.output_token_ids.append(t)
        tokens.append(out[target])
    return tokens


@pytest.mark.parametrize("params", SEEDED_VARIANTS)
def test_seeded_output_depends_only_on_seed_and_logits(params: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(8)
    vocab, n_steps = 3000, 12
    steps = [torch.randn(vocab, generator=gen) for _ in range(n_steps)]
    others = torch.randn(n_steps, 5, vocab, generator=gen)

    torch.manual_seed(100)
    alone = _run_steps([seq(**params)], 0, steps, others)
    torch.manual_seed(100)
    assert _run_steps([seq(**params)], 0, steps, others) == alone  # reproducible

    torch.manual_seed(999)  # a different global RNG state must not matter either
    batch = [
        seq(temperature=1.0, top_k=300),  # unseeded; widens the shared top-k
        seq(temperature=0.7, seed=5, min_p=0.1),
        seq(**params),
        seq(temperature=0.0),
        seq(temperature=1.3, top_p=0.5, presence_penalty=1.0),
    ]
    assert _run_steps(batch, 2, steps, others) == alone
    # Position in the batch does not matter either.
    torch.manual_seed(3)
    assert _run_steps([seq(temperature=1.0), seq(**params)], 1, steps, others) == alone

    other_seed = {**params, "seed": params["seed"] + 1}
    assert _run_steps([seq(**other_seed)], 0, steps, others) != alone


# --- penalties and min_tokens -------------------------------------------------------------------------------

RAW = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0, 1.0, -2.0]
PROMPT = [0, 1]
OUTPUT = [2, 2, 3, 0]  # counts: 2 -> 2, 3 -> 1, 0 -> 1; token 1 only in the prompt


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Seen tokens (prompt or output): positive logits divided by 2, negative multiplied.
        ({"repetition_penalty": 2.0}, [1.0, -2.0, 0.25, -1.0, 3.0, 0.0, 1.0, -2.0]),
        ({"repetition_penalty": 0.5}, [4.0, -0.5, 1.0, -0.25, 3.0, 0.0, 1.0, -2.0]),
        # Output tokens only: minus penalty * count.
        ({"frequency_penalty": 0.5}, [1.5, -1.0, -0.5, -1.0, 3.0, 0.0, 1.0, -2.0]),
        ({"frequency_penalty": -1.0}, [3.0, -1.0, 2.5, 0.5, 3.0, 0.0, 1.0, -2.0]),
        # Output tokens only: minus penalty once.
        ({"presence_penalty": 0.25}, [1.75, -1.0, 0.25, -0.75, 3.0, 0.0, 1.0, -2.0]),
        # Repetition first, then frequency, then presence.
        (
            {"repetition_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 0.25},
            [0.25, -2.0, -1.0, -1.75, 3.0, 0.0, 1.0, -2.0],
        ),
    ],
)
def test_penalties_match_hand_computation(params: dict[str, Any], expected: list[float]) -> None:
    sampler = Sampler()
    raw = torch.tensor([RAW, RAW, RAW])
    rows = [seq(PROMPT, OUTPUT, **params), seq(PROMPT, OUTPUT), seq(PROMPT, [], **params)]
    processed = sampler.process_logits(raw, rows)
    assert processed[0].tolist() == expected
    assert processed[1].tolist() == RAW  # no penalties requested: untouched
    # With no output yet, only the repetition penalty (on the prompt) applies.
    rep = params.get("repetition_penalty", 1.0)
    prompt_only = [(v / rep if v > 0 else v * rep) if i in PROMPT else v for i, v in enumerate(RAW)]
    assert processed[2].tolist() == prompt_only
    assert raw[0].tolist() == RAW  # the caller's logits are not modified


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([RAW])
    assert Sampler()(logits, [seq(PROMPT, OUTPUT, temperature=0.0)]).token_ids == [4]
    # Tokens 4 (3.0) and 0 (2.0) seen in the prompt: 0.75 and 0.5 fall below token 6 (1.0).
    assert Sampler()(logits, [seq([4, 0], [], temperature=0.0, repetition_penalty=4.0)]).token_ids == [6]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    sampler = Sampler()
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 7], logits[0, 3] = 10.0, 9.0, 8.0
    stop: dict[str, Any] = {"temperature": 0.0, "min_tokens": 2, "stop_token_ids": [7, 123456]}
    assert sampler(logits, [seq(output=[], **stop)]).token_ids == [3]
    assert sampler(logits, [seq(output=[5], **stop)]).token_ids == [3]
    assert sampler(logits, [seq(output=[5, 5], **stop)]).token_ids == [EOS]
    # ignore_eos lifts the EOS mask only; stop ids stay masked.
    assert sampler(logits, [seq(output=[], ignore_eos=True, **stop)]).token_ids == [EOS]
    flipped = logits.clone()
    flipped[0, 7], flipped[0, EOS] = 10.0, 9.0
    assert sampler(flipped, [seq(output=[], ignore_eos=True, **stop)]).token_ids == [EOS]
    # Every EOS id is masked, and sampled rows never draw a masked token.
    multi = torch.zeros(1, 10)
    multi[0, [2, 4, EOS]] = 5.0
    torch.manual_seed(2)
    tokens = Sampler()(
        multi.expand(500, -1).contiguous(),
        [seq(eos=frozenset({2, EOS}), temperature=1.0, min_tokens=1, stop_token_ids=[4]) for _ in range(500)],
    ).token_ids
    assert not {2, 4, EOS} & set(tokens)
    assert len(set(tokens)) == 7


# --- logprobs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_come_from_raw_logits(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    logits = (torch.randn(5, 300, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    rows = [
        seq(temperature=0.0, logprobs=3),
        seq(temperature=0.5, top_k=50, repetition_penalty=1.5, logprobs=5, output=[7, 8]),
        seq(temperature=1.0, logprobs=0),
        seq(temperature=1.0),
        seq(temperature=2.0, seed=3, logprobs=20),
    ]
    out = Sampler()(logits, rows)
    ref = torch.log_softmax(logits.float(), -1)
    assert out.logprobs[3] is None
    for i, lp in enumerate(out.logprobs):
        if lp is None:
            continue
        token = out.token_ids[i]
        assert lp.token_id == token
        assert math.isclose(lp.logprob, ref[i, token].item(), rel_tol=1e-6, abs_tol=1e-6)
        assert lp.rank == 1 + int((ref[i] > ref[i, token]).sum())
        k = rows[i].params.logprobs or 0
        top_vals, top_ids = ref[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.logprobs[0] is not None and out.logprobs[0].rank == 1  # greedy takes the raw argmax here
    assert out.logprobs[2] is not None and out.logprobs[2].top == []


# --- mixed batches and API edges ----------------------------------------------------------------------------


def test_mixed_batch_rows_match_their_solo_results() -> None:
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(6, 2000, generator=gen) * 2

    def rows() -> list[Sequence]:
        return [
            seq(temperature=0.0),
            seq(temperature=0.8, top_k=5),
            seq(temperature=0.8, seed=11, top_p=0.9),
            seq([5, 6], [7, 7], temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7),
            seq(temperature=1.5, top_k=1),
            seq(temperature=1.0, seed=12, min_p=0.2, logprobs=2),
        ]

    torch.manual_seed(0)
    batched = Sampler()(logits, rows())
    sampler = Sampler()
    solo = [sampler(logits[i : i + 1], [r]) for i, r in enumerate(rows())]
    for i in (0, 2, 3, 4, 5):  # deterministic rows: greedy, seeded
        assert batched.token_ids[i] == solo[i].token_ids[0], i
    assert batched.token_ids[1] in logits[1].topk(5).indices.tolist()
    processed = sampler.process_logits(logits[3:4], [rows()[3]])
    assert batched.token_ids[3] == int(processed.argmax())
    assert batched.token_ids[0] == int(logits[0].argmax())
    assert batched.token_ids[4] == int(logits[4].argmax())
    probs = torch.softmax(logits[5], -1)
    assert probs[batched.token_ids[5]] >= 0.2 * probs.max()
    assert batched.logprobs[5] == solo[5].logprobs[0]
    assert [lp is None for lp in batched.logprobs] == [True] * 5 + [False]


def test_shape_mismatch_and_empty_batch() -> None:
    sampler = Sampler()
    with pytest.raises(ValueError, match="do not match"):
        sampler(torch.zeros(2, 10), [seq()])
    empty = sampler(torch.zeros(0, 10), [])
    assert empty.token_ids == [] and empty.logprobs == []


def test_benchmark_runs_every_path() -> None:
    timings = benchmark(batch=4, vocab=2048, iters=1)
    assert "greedy" in timings and len(timings) == 11
    assert all(ms > 0 for ms in timings.values())
