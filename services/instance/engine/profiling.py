"""Prefill-time profiling at instance start-up: real single-prompt prefills through the engine, one length
at a time, so the coordinator can predict the time a prefill window needs.

Each measurement is one request of random token ids with `max_tokens=1`, timed from submission until its
first token, so it covers exactly what a prefill costs this engine: scheduling, the packed forward (several
steps when the prompt exceeds the step budget), and sampling. The request then finishes and frees its
blocks. The profile's steps count in the engine's cumulative statistics.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Iterable

import torch

from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.policies import NoDGPolicy
from services.instance.engine.sampling_params import SamplingParams
from shared.prefill_profile import PrefillProfile

log = logging.getLogger(__name__)

QUICK_LENGTHS = (16, 32, 64)
SMALLEST_LENGTH = 16


def default_lengths(max_model_len: int) -> list[int]:
    """16, 32, 64, … while a prompt of that length still leaves room for one generated token."""
    lengths = []
    n = SMALLEST_LENGTH
    while n < max_model_len:
        lengths.append(n)
        n *= 2
    return lengths


def profile_prefill(
    target: LLMEngine | torch.nn.Module,
    lengths: Iterable[int] | None = None,
    *,
    repeats: int = 3,
    warmup: int = 1,
    time_budget: float = 120.0,
    quick: bool = False,
    seed: int = 0,
) -> PrefillProfile:
    """Median prefill seconds of `repeats` runs per prompt length, after `warmup` unmeasured runs.

    `target` is an idle engine (it is profiled as configured, whatever its policy: the runs go through a
    temporary `nodg` policy so a closed PaDG window does not block them), or a model loaded with the paged
    attention, for which a temporary engine with a pool just big enough is built. Lengths run shortest
    first; a length is skipped, with every longer one, once its predicted cost (quadratic growth from the
    previous length, the worst case for attention) would overrun `time_budget` seconds. The first length is
    always measured. `quick` profiles only QUICK_LENGTHS (unless `lengths` is given), for tests.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if isinstance(target, LLMEngine):
        engine = target
        wanted = _usable(lengths, quick, engine.max_model_len)
    else:
        wanted = _usable(lengths, quick, _model_max_len(target))
        engine = _engine_for(target, max(wanted, default=SMALLEST_LENGTH))
        wanted = _usable(wanted, False, engine.max_model_len)
    if not wanted:
        raise ValueError(f"no profile length fits the model's context of {engine.max_model_len} tokens")
    if engine.has_unfinished_requests():
        raise RuntimeError("profile an idle engine: measurements must not share steps with requests")

    run = _Runner(engine, seed)
    saved_policy = engine.scheduler.policy
    engine.scheduler.policy = NoDGPolicy()
    try:
        began = time.perf_counter()
        for _ in range(warmup):
            run(wanted[0])
        points: list[tuple[int, float]] = []
        for n in wanted:
            if points:
                last_n, last_t = points[-1]
                predicted = last_t * (n / last_n) ** 2 * repeats
                if time.perf_counter() - began + predicted > time_budget:
                    log.info("prefill profile stops before %d tokens: time budget %.1fs", n, time_budget)
                    break
            points.append((n, statistics.median(run(n) for _ in range(repeats))))
    finally:
        engine.scheduler.policy = saved_policy
    return PrefillProfile(
        points=points,
        kv_blocks_total=engine.blocks.num_blocks,
        block_size=engine.blocks.block_size,
        measured_at=time.time(),
        threads=torch.get_num_threads(),
    )


class _Runner:
    """One timed single-prompt prefill per call."""

    def __init__(self, engine: LLMEngine, seed: int):
        self.engine = engine
        self.rng = random.Random(seed)
        self.count = 0
        self.params = SamplingParams(max_tokens=1, temperature=0.0)

    def __call__(self, num_tokens: int) -> float:
        engine = self.engine
        request_id = f"ecoserve-profile-{self.count}"
        self.count += 1
        prompt = [self.rng.randrange(engine.vocab_size) for _ in range(num_tokens)]
        engine.add_request(request_id, prompt, self.params)
        try:
            began = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            return time.perf_counter() - began
        finally:
            engine.abort_request(request_id)  # only does something when a step raised


def _usable(lengths: Iterable[int] | None, quick: bool, max_model_len: int) -> list[int]:
    if lengths is None:
        lengths = QUICK_LENGTHS if quick else default_lengths(max_model_len)
    return sorted({n for n in lengths if 0 < n < max_model_len})


def _model_max_len(model: torch.nn.Module) -> int:
    return int(getattr(model.config.get_text_config(), "max_position_embeddings", 4096))


def _engine_for(model: torch.nn.Module, longest: int) -> LLMEngine:
    """A temporary engine whose pool holds one prompt of `longest` tokens plus its generated token."""
    config = EngineConfig(policy="nodg")
    config.num_kv_blocks = -(-(longest + 1) // config.block_size)
    return LLMEngine(model, eos_token_ids_of(model), config)
