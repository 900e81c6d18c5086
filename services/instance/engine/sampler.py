"""Turn one engine step's logits into next tokens (and logprobs), following vLLM's sampling semantics.

Order per row: repetition / presence / frequency penalties, the min_tokens mask on EOS and stop ids, then
greedy argmax, or temperature -> top_k -> top_p -> min_p -> draw. Logprobs come from the raw logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.instance.engine.sampling_params import SamplingParams
from services.instance.engine.sequence import Sequence, TokenLogprobs

# vLLM treats temperatures below this as greedy; dividing by a near-zero temperature would overflow fp32.
SAMPLING_EPS = 1e-5
# Row maxima are found per chunk first: amax is vectorised on CPU, a long-row argmax is not (~10x slower).
_ARGMAX_CHUNK = 1024
# top_p first looks for the nucleus among this many most likely tokens and sorts the whole vocabulary only
# for rows whose nucleus is wider: topk(256) costs ~5% of a full sort at V=49152.
_TOP_P_CANDIDATES = 256


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask for logprobs


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < SAMPLING_EPS or params.top_k == 1


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of [N, V], identical to x.argmax(-1) (first index on ties), in any dtype."""
    x = x.contiguous()
    vocab = x.shape[1]
    n_full = vocab // _ARGMAX_CHUNK
    if n_full < 2:
        return x.argmax(-1)
    body = x[:, : n_full * _ARGMAX_CHUNK].unflatten(-1, (n_full, _ARGMAX_CHUNK))
    chunk_max = body.amax(-1)
    if vocab % _ARGMAX_CHUNK:
        chunk_max = torch.cat([chunk_max, x[:, n_full * _ARGMAX_CHUNK :].amax(-1, keepdim=True)], dim=1)
    # argmax returns the first chunk holding the row maximum, so the first maximal index is inside it.
    start = chunk_max.argmax(-1) * _ARGMAX_CHUNK
    offsets = torch.arange(_ARGMAX_CHUNK, device=x.device)
    # The tail chunk is short: clamping repeats the last column after its real position, which argmax
    # (first occurrence) never prefers.
    cols = (start.unsqueeze(1) + offsets).clamp_(max=vocab - 1)
    return start + x.gather(1, cols).argmax(-1)


def _padded(rows: list[list[int]], pads: list[int], device: torch.device) -> torch.Tensor:
    """Ragged id lists as one [n, max_len] long tensor, row i padded with pads[i]."""
    width = max(max((len(r) for r in rows), default=0), 1)
    flat = [r + [pad] * (width - len(r)) for r, pad in zip(rows, pads, strict=True)]
    return torch.tensor(flat, dtype=torch.long, device=device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    repetition: list[float],
    presence: list[float],
    frequency: list[float],
) -> None:
    """Apply vLLM's penalties in place to fp32 logits [n, V], one row per entry of the lists.

    Only the columns of tokens the rows have seen are touched (gather / scatter over [n, len]), so the cost
    follows context length instead of n * V passes over the vocabulary.
    """
    device = logits.device
    if any(r != 1.0 for r in repetition):
        seen = [p + o for p, o in zip(prompt_ids, output_ids, strict=True)]
        # Pad with a token the row has seen: its duplicate gets the same penalised value, so the scatter is
        # still exact. A row that has seen nothing pads with 0 and a factor of 1, which rewrites it unchanged.
        pads = [s[0] if s else 0 for s in seen]
        factors = [r if s else 1.0 for r, s in zip(repetition, seen, strict=True)]
        idx = _padded(seen, pads, device)
        rep = torch.tensor(factors, dtype=torch.float32, device=device).unsqueeze(1)
        vals = logits.gather(1, idx)
        logits.scatter_(1, idx, torch.where(vals > 0, vals / rep, vals * rep))
    has_freq = any(f != 0.0 for f in frequency)
    has_pres = any(p != 0.0 for p in presence)
    if not (has_freq or has_pres) or not any(output_ids):
        return
    # Pad with V so padding sorts last; padded slots then add 0.0 to column 0, which changes nothing.
    vocab = logits.shape[1]
    out = _padded(output_ids, [vocab] * len(output_ids), device).sort(dim=-1).values
    # Ids are sorted, so each distinct token's first slot is where the id changes, and its count is the
    # width of its run. Only first slots carry a delta, so each logit gets exactly vLLM's
    # (x - frequency * count) - presence, with no per-occurrence rounding.
    first = torch.ones_like(out, dtype=torch.bool)
    first[:, 1:] = out[:, 1:] != out[:, :-1]
    first &= out < vocab
    cols = out.masked_fill(out >= vocab, 0)
    if has_freq:
        count = torch.searchsorted(out, out, right=True) - torch.searchsorted(out, out)
        freq = torch.tensor(frequency, dtype=torch.float32, device=device).unsqueeze(1)
        logits.scatter_add_(1, cols, torch.where(first, -(freq * count), 0.0))
    if has_pres:
        pres = torch.tensor(presence, dtype=torch.float32, device=device).unsqueeze(1)
        logits.scatter_add_(1, cols, torch.where(first, -pres, 0.0))


def _nucleus_keep(
    probs: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """Boolean [m, V] of each row's nucleus, given its candidate probs `vals` (descending) at columns idx."""
    # A token is kept while the mass before it is still short of top_p, so the first token always is.
    keep_sorted = (vals.cumsum(-1) - vals) < p.unsqueeze(1)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, keep_sorted)


def apply_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """In place on logits [m, V]: keep each row's top_k largest (0: no limit; ties with the k-th are kept,
    as in vLLM), then the smallest most likely set of what is left whose mass reaches top_p (1.0: no limit).

    One topk call serves both filters, and the nucleus is looked for among the candidates first: a full sort
    of the vocabulary happens only for rows whose nucleus is wider than them.
    """
    vocab = x.shape[1]
    device = x.device
    width = min(vocab, max(k if k else _TOP_P_CANDIDATES for k in top_k))
    vals, idx = x.topk(width, dim=-1)
    if any(top_k):
        k = torch.tensor([k if k else width for k in top_k], dtype=torch.long, device=device).unsqueeze(1)
        limited = torch.tensor([bool(k) for k in top_k], device=device).unsqueeze(1)
        kth = torch.where(limited, vals.gather(1, k - 1), float("-inf"))
        x.masked_fill_(x < kth, float("-inf"))
    if all(p >= 1.0 for p in top_p):
        return
    p = torch.tensor(top_p, dtype=torch.float32, device=device)
    probs = x.softmax(-1)
    # softmax preserves order, so the candidates' probs are still descending.
    cand = probs.gather(1, idx)
    keep = _nucleus_keep(probs, cand, idx, p)
    if width < vocab:
        wide = ((cand.sum(-1) < p) & (p < 1.0)).nonzero().squeeze(1)
        if wide.numel():
            sub = probs.index_select(0, wide)
            sorted_vals, sorted_idx = sub.sort(dim=-1, descending=True)
            keep[wide] = _nucleus_keep(sub, sorted_vals, sorted_idx, p[wide])
    keep |= (p >= 1.0).unsqueeze(1)
    x.masked_fill_(~keep, float("-inf"))


def _on_rows(x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], None]) -> None:
    """Run an in-place transform on the given rows of x only (all of x without a copy when rows is all)."""
    if len(rows) == x.shape[0]:
        fn(x)
        return
    idx = torch.tensor(rows, dtype=torch.long, device=x.device)
    sub = x.index_select(0, idx)
    fn(sub)
    x.index_copy_(0, idx, sub)


class Sampler:
    """Stateless apart from the per-request generators it stores on seeded sequences."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(seqs)} sequences")
        if not seqs:
            return SamplerOutput([], [])
        greedy = [is_greedy(s.params) for s in seqs]
        if (
            all(greedy)
            and not any(s.params.needs_penalties for s in seqs)
            and not self._min_tokens_pairs(seqs, logits.shape[1])
        ):
            # The common decode step: one argmax over the whole batch, no fp32 copy.
            token_ids: list[int] = fast_argmax(logits).tolist()
        else:
            token_ids = self._sample(self.process_logits(logits, seqs), seqs, greedy)
        return SamplerOutput(token_ids, self._logprobs(logits, seqs, token_ids))

    def process_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """An fp32 copy of the logits with penalties and the min_tokens mask applied (input untouched)."""
        work = logits.to(torch.float32, copy=True)
        vocab = work.shape[1]
        pen_rows = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        if pen_rows:
            pen = [seqs[i] for i in pen_rows]
            all_rows = len(pen_rows) == len(seqs)
            idx = torch.tensor(pen_rows, dtype=torch.long, device=work.device)
            sub = work if all_rows else work.index_select(0, idx)
            apply_penalties(
                sub,
                [s.prompt_token_ids for s in pen],
                [s.output_token_ids for s in pen],
                [s.params.repetition_penalty for s in pen],
                [s.params.presence_penalty for s in pen],
                [s.params.frequency_penalty for s in pen],
            )
            if not all_rows:
                work.index_copy_(0, idx, sub)
        pairs = self._min_tokens_pairs(seqs, vocab)
        if pairs:
            rows, cols = zip(*pairs, strict=True)
            work[torch.tensor(rows, device=work.device), torch.tensor(cols, device=work.device)] = float(
                "-inf"
            )
        return work

    @staticmethod
    def _min_tokens_pairs(seqs: list[Sequence], vocab: int) -> list[tuple[int, int]]:
        """(row, token) pairs to mask: stop ids and EOS of rows still short of min_tokens."""
        pairs: list[tuple[int, int]] = []
        for i, s in enumerate(seqs):
            p = s.params
            if len(s.output_token_ids) >= p.min_tokens:
                continue
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned |= s.eos_token_ids
            # stop_token_ids are user input: ids outside the vocabulary can never be sampled anyway.
            pairs.extend((i, t) for t in sorted(banned) if t < vocab)
        return pairs

    def _sample(self, work: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> list[int]:
        """Greedy rows take the argmax of the processed logits; the rest are drawn. work is consumed."""
        if all(greedy):
            return fast_argmax(work).tolist()
        if not any(greedy):
            return self._draw(work, seqs).tolist()
        device = work.device
        out = torch.empty(len(seqs), dtype=torch.long, device=device)
        g_idx = torch.tensor([i for i, g in enumerate(greedy) if g], dtype=torch.long, device=device)
        out[g_idx] = fast_argmax(work.index_select(0, g_idx))
        s_rows = [i for i, g in enumerate(greedy) if not g]
        s_idx = torch.tensor(s_rows, dtype=torch.long, device=device)
        # index_select copies, so the filters in _draw may work in place.
        out[s_idx] = self._draw(work.index_select(0, s_idx), [seqs[i] for i in s_rows])
        return out.tolist()

    def _draw(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top_k, top_p, min_p, then one inverse-CDF draw per row; x [m, V] is consumed."""
        device = x.device
        vocab = x.shape[1]
        params = [s.params for s in seqs]
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            x.div_(torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1))
        f_rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
        if f_rows:
            top_k = [params[i].top_k if 0 < params[i].top_k < vocab else 0 for i in f_rows]
            top_p = [params[i].top_p for i in f_rows]
            _on_rows(x, f_rows, lambda sub: apply_top_k_top_p(sub, top_k, top_p))
        probs = x.softmax(-1)
        mp_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
        if mp_rows:
            min_p = torch.tensor([params[i].min_p for i in mp_rows], dtype=torch.float32, device=device)

            def drop_below_min_p(sub: torch.Tensor) -> None:
                # No renormalisation: the inverse-CDF draw scales by each row's total mass.
                sub.masked_fill_(sub < min_p.unsqueeze(1) * sub.amax(-1, keepdim=True), 0.0)

            _on_rows(probs, mp_rows, drop_below_min_p)
        # One uniform per row keeps the draw cheap (exponential races need V random numbers per row), and
        # lets a seeded row consume its own generator only: its tokens cannot depend on the batch.
        r = torch.empty(len(seqs), dtype=torch.float32, device=device)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if len(unseeded) == len(seqs):
            r.uniform_()
        elif unseeded:
            r[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), device=device)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                r[i] = torch.rand((), device=device, generator=self._generator(seq, device))
        cdf = probs.cumsum(-1)
        # u lies in (0, total]; the first index with cdf >= u then has non-zero probability, because a
        # zero-probability token repeats the cdf of the token before it. Filtered tokens are never drawn.
        u = (1.0 - r).unsqueeze(1) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=vocab - 1)

    @staticmethod
    def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.generator is None:
            assert seq.params.seed is not None
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
        return seq.generator

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, seqs: list[Sequence], token_ids: list[int]
    ) -> list[TokenLogprobs | None]:
        result: list[TokenLogprobs | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return result
        device = logits.device
        raw = logits
        if len(rows) < len(seqs):
            raw = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=device))
        # vLLM's default "raw_logprobs": the model's distribution before penalties and temperature.
        lp = torch.log_softmax(raw.float(), dim=-1)
        chosen = torch.tensor([token_ids[i] for i in rows], dtype=torch.long, device=device).unsqueeze(1)
        chosen_lp = lp.gather(1, chosen)
        ranks = ((lp > chosen_lp).sum(-1) + 1).tolist()
        chosen_vals = chosen_lp.squeeze(1).tolist()
        counts = [seqs[i].params.logprobs or 0 for i in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        top_vals: list[list[float]] = [[] for _ in rows]
        if max(counts):
            vals, ids = lp.topk(max(counts), dim=-1)
            top_ids, top_vals = ids.tolist(), vals.tolist()
        for j, i in enumerate(rows):
            k = counts[j]
            top = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
            result[i] = TokenLogprobs(token_ids[i], chosen_vals[j], ranks[j], top)
        return result


def benchmark(batch: int = 64, vocab: int = 49152, iters: int = 50) -> dict[str, float]:
    """Best-of-3 milliseconds per call of the sampler's paths on random logits (for the timing print).

    Rows carry a 512-token prompt and 128 output tokens so the penalties have real work. "flat" logits are
    N(0, 1): every nucleus is far wider than the top_p candidates (the full-sort worst case); "peaked" ones
    are N(0, 4), closer to a trained LM, where the top 256 tokens hold over 0.9 of the mass.
    """
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(batch, vocab, generator=gen)
    peaked = flat * 4
    history = torch.randint(0, vocab, (batch, 640), generator=gen).tolist()

    def seqs_with(**kw: Any) -> list[Sequence]:
        params = SamplingParams(**kw)
        return [
            Sequence(f"r{i}", h[:512], params, eos_token_ids=frozenset({0}), output_token_ids=h[512:])
            for i, h in enumerate(history)
        ]

    sampler = Sampler()
    cases: dict[str, Callable[[], object]] = {"torch.argmax (reference)": lambda: flat.argmax(-1).tolist()}
    for name, logits, kw in [
        ("greedy", flat, {"temperature": 0.0}),
        ("greedy bf16 logits", flat.bfloat16(), {"temperature": 0.0}),
        (
            "greedy + 3 penalties",
            flat,
            {
                "temperature": 0.0,
                "repetition_penalty": 1.1,
                "frequency_penalty": 0.5,
                "presence_penalty": 0.5,
            },
        ),
        ("greedy + logprobs=5", flat, {"temperature": 0.0, "logprobs": 5}),
        ("t=0.8", flat, {"temperature": 0.8}),
        ("t=0.8 seeded", flat, {"temperature": 0.8, "seed": 7}),
        ("t=0.8 top_k=50 top_p=0.9", flat, {"temperature": 0.8, "top_k": 50, "top_p": 0.9}),
        ("t=0.8 top_p=0.9 peaked", peaked, {"temperature": 0.8, "top_p": 0.9}),
        ("t=0.8 top_p=0.9 flat", flat, {"temperature": 0.8, "top_p": 0.9}),
        ("t=0.8 min_p=0.05", flat, {"temperature": 0.8, "min_p": 0.05}),
    ]:
        seqs = seqs_with(**kw)
        cases[name] = lambda logits=logits, seqs=seqs: sampler(logits, seqs)
    timings: dict[str, float] = {}
    for name, run in cases.items():
        run()
        n = 3 if name.endswith("flat") else iters
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            best = min(best, (time.perf_counter() - t0) / n * 1e3)
        timings[name] = best
    return timings


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case, ms in benchmark().items():
        print(f"B=64 V=49152 {case:28s} {ms:8.3f} ms")
