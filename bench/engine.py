"""End-to-end engine benchmark: ecoserve's LLMEngine vs HF static `generate` vs transformers' continuous
batching, on the same model, workload and torch thread count.

Methods (each measured in a fresh subprocess of this script, so peak RSS is per method and an OOM kill only
loses that one measurement):
  ecoserve  LLMEngine with the paged attention backend; every request is added at time 0, then `step()` runs
            until all are done. Policy `nodg` by default, whose steps are either pure prefill or pure decode,
            so prefill and decode throughput are timed directly from those steps. The KV pool holds every
            request at once (no preemption).
  static    `model.generate` on a left-padded batch (sdpa, greedy), all prompts in one batch unless
            --hf-batch-size splits them. A static batch can't stop rows at different lengths, so each batch
            runs to its longest request (min_new_tokens = max_new_tokens = that maximum, so EOS can't stop it
            early) and only each request's own first max_new tokens count as output.
  cb        transformers' continuous batching (what `model.generate_batch` runs), with an explicit
            ContinuousBatchingConfig: its default CPU sizing claims 60 % of total RAM and got the process
            OOM-killed on the shared box. `generate_batch` takes one `max_new_tokens` for all requests and
            takes EOS from the model config, so this drives the same manager the way `generate_batch` does
            (`continuous_batching_context_manager` + `get_result`) but calls `add_request` per request with
            its own `max_new_tokens` and `eos_token_id=-1` (no EOS), i.e. exactly the same work as ecoserve.

For static and cb, prefill and decode throughput are derived as in research/feasibility.md §4 from two runs:
T(1) with one new token per request, and T(full):
  prefill tok/s = real prompt tokens / T(1)
  decode tok/s  = (output tokens - requests) / (T(full) - T(1))
(for static also `decode_tok_s_computed`, which counts the padded tokens past each request's own length).

Workload: N prompts of uniform random length in --prompt-len (default 32..512) made of random token ids from
the tokenizer's ordinary vocabulary (special tokens excluded), seeded; uniform --new-tokens (default 64..128)
new tokens per request, EOS ignored everywhere. Random ids cost exactly what text costs and make the workload
identical for any tokenizer. The lengths depend only on (seed, N), so both models get the same shape.

Greedy check: the first --check-requests requests' tokens from ecoserve are compared with static generate's
and cb's, and static's with cb's (two HF code paths, to calibrate how often bf16 near-ties flip). A mismatch
is reported, not fatal: static generate masks EOS through min_new_tokens while ecoserve's ignore_eos and cb's
eos_token_id=-1 don't, so a mismatch where either side picked EOS is flagged.

--decode-step: one whole-model decode step at batch B and equal context (every sequence decoding): ecoserve's
`engine.step()` vs an HF forward of one token per sequence with a contiguous DynamicCache plus the argmax,
interleaved step by step so background load hits both alike; median ms per step and the ratio (bar: ≤ 1.10).

Models: `llama-small` (~27M random Llama built into the cache, fp32 by default) and `smollm2-135m` (bf16 by
default); write `name:dtype` to choose the dtype (fp32, bf16).

    .venv/bin/python bench/engine.py --quick                       # smoke run, well under 2 minutes
    .venv/bin/python bench/engine.py                               # full end-to-end comparison
    .venv/bin/python bench/engine.py --decode-step                 # decode-step bar check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("ecoserve", "static", "cb")
MODEL_DEFAULT_DTYPE = {"llama-small": "fp32", "smollm2-135m": "bf16"}
MODEL_ALIASES = {"smollm2": "smollm2-135m", "llama": "llama-small"}
DTYPES = ("fp32", "bf16")
DEFAULT_JSON = REPO / "bench" / "results" / "engine.json"
DEFAULT_DECODE_JSON = REPO / "bench" / "results" / "engine-decode-step.json"
DECODE_STEP_BAR = 1.10
# Background CPU use (in cores, by other processes) above which the results are flagged as unreliable.
BACKGROUND_WARN_CORES = 0.2


@dataclass(frozen=True)
class Sizes:
    models: str
    prompts: str
    prompt_len: str
    new_tokens: str
    decode_batch: int
    decode_ctx: int
    decode_steps: int


FULL = Sizes("llama-small,smollm2-135m", "16,64", "32,512", "64,128", 64, 300, 10)
# Small enough that the whole --quick run (six worker processes) stays well under two minutes on 2 cores.
QUICK = Sizes("llama-small", "4,8", "16,64", "8,16", 8, 64, 5)


# -- helpers shared by the parent and the workers ---------------------------------------------------------


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


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _system_cpu_s() -> tuple[float, float] | None:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all of this process's threads
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Background load while a measurement runs, in cores: CPU time used by every other process (machine busy
    time minus this process's), and time stolen by the hypervisor. The load average can't tell these apart
    from our own work, and under oversubscription OpenMP barriers slow down ~100× (feasibility.md §4)."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._system = _system_cpu_s()
        self._own = _own_cpu_s()
        self._loadavg = loadavg()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        system = _system_cpu_s()
        result: dict[str, Any] = {"loadavg_before": self._loadavg, "loadavg_after": loadavg()}
        if system is None or self._system is None or wall <= 0:
            return result | {"background_cores": None, "steal_cores": None}
        busy = system[0] - self._system[0]
        own = _own_cpu_s() - self._own
        # Clamped: /proc/stat ticks and rusage differ in granularity by ~10 ms.
        result["background_cores"] = max(0.0, busy - own) / wall
        result["steal_cores"] = (system[1] - self._system[1]) / wall
        return result


def git_info() -> dict[str, Any]:
    # GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing (writing) the index: this only reads.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=20, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def parse_range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: want LO,HI with 1 <= LO <= HI")
    return lo, hi


def parse_model(spec: str) -> tuple[str, str]:
    name, _, dtype = spec.strip().partition(":")
    name = MODEL_ALIASES.get(name, name)
    if name not in MODEL_DEFAULT_DTYPE:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODEL_DEFAULT_DTYPE)}")
    dtype = dtype or MODEL_DEFAULT_DTYPE[name]
    if dtype not in DTYPES:
        raise SystemExit(f"unknown dtype {dtype!r} for {name}; choose from {', '.join(DTYPES)}")
    return name, dtype


def model_path(name: str, dtype: str) -> Path:
    """The model's folder, built or converted into the ecoserve cache on first use."""
    from services.instance.models import smollm2, tiny
    from services.instance.models.cache import cache_root

    if name == "llama-small":
        # Saved in fp32; the loader casts to the requested dtype.
        return tiny.cached_model("llama", cache_root() / "models" / "random", size="small")
    return smollm2.default_model_path(dtype)


# -- workload ------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    prompts: list[list[int]]
    max_new: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_new)


def make_workload(
    path: Path, n: int, seed: int, prompt_len: tuple[int, int], new_tokens: tuple[int, int]
) -> Workload:
    from services.instance.models.loader import load_tokenizer, read_config

    tokenizer = load_tokenizer(path)
    vocab_limit = min(tokenizer.vocab_size, int(read_config(path)["vocab_size"]))
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(vocab_limit) if i not in special]
    # Lengths come from their own stream, so both models (different vocabularies) get the same shape.
    shape_rng = random.Random(f"shape-{seed}-{n}")
    lengths = [shape_rng.randint(*prompt_len) for _ in range(n)]
    max_new = [shape_rng.randint(*new_tokens) for _ in range(n)]
    ids_rng = random.Random(f"ids-{seed}-{n}")
    prompts = [[ids_rng.choice(ordinary) for _ in range(length)] for length in lengths]
    return Workload(prompts, max_new)


# -- workers (run in a subprocess; torch threads are set before anything else is imported) -------------------


def _load(spec: dict[str, Any], attn_implementation: str) -> PreTrainedModel:
    from services.instance.models.loader import load_model

    return load_model(spec["model_path"], dtype=spec["dtype"], attn_implementation=attn_implementation)


def _timed_runs(repeats: int, run: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    runs = []
    for i in range(repeats):
        meter = CpuMeter()
        result = run(i)
        runs.append(result | meter.stop())
    return runs


def worker_ecoserve(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from services.instance.engine.attention import ATTENTION_NAME
    from services.instance.engine.kernels import native_available
    from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
    from services.instance.engine.sampling_params import SamplingParams

    opts = spec["options"]
    prompts: list[list[int]] = spec["prompts"]
    max_new: list[int] = spec["max_new"]
    model = _load(spec, ATTENTION_NAME)
    bs = opts["block_size"]
    warm_prompt = prompts[0][:32]
    warm_new = 4
    # The pool holds every request's whole sequence at once, so nothing is ever preempted or queued for KV.
    blocks = sum(math.ceil((len(p) + n) / bs) for p, n in zip(prompts, max_new, strict=True))
    blocks = max(blocks, math.ceil((len(warm_prompt) + warm_new) / bs)) + 1
    config = EngineConfig(
        policy=opts["policy"],
        block_size=bs,
        num_kv_blocks=blocks,
        max_num_seqs=max(len(prompts), 1),
        max_num_batched_tokens=opts["max_num_batched_tokens"],
    )
    setup_start = time.perf_counter()
    engine = LLMEngine(model, eos_token_ids_of(model), config)
    setup_s = time.perf_counter() - setup_start

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    # Warm-up: first-call costs (native kernel load, allocator, thread pool) stay out of the timed runs.
    engine.add_request("warmup", warm_prompt, greedy(warm_new))
    while engine.has_unfinished_requests():
        engine.step()

    def run(rep: int) -> dict[str, Any]:
        tokens: dict[str, list[int]] = {}
        # Per step kind: [seconds, tokens, steps].
        kinds = {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0], "mixed": [0.0, 0, 0]}
        start = time.perf_counter()
        arrival = time.monotonic()
        for i, (prompt, n) in enumerate(zip(prompts, max_new, strict=True)):
            engine.add_request(f"r{rep}-{i}", prompt, greedy(n), arrival_time=arrival)
            tokens[f"r{rep}-{i}"] = []
        while engine.has_unfinished_requests():
            prefilled_before = engine.stats().prefill_tokens_total
            t0 = time.perf_counter()
            outputs = engine.step()
            dt = time.perf_counter() - t0
            prefilled = engine.stats().prefill_tokens_total - prefilled_before
            # An output whose request has exactly one token came from a prefill; the others are decodes.
            decoded = sum(1 for o in outputs if o.num_output_tokens > 1)
            kind = "decode" if not prefilled else "prefill" if not decoded else "mixed"
            entry = kinds[kind]
            entry[0] += dt
            entry[1] += prefilled + decoded  # one of the two is 0 unless the step is mixed
            entry[2] += 1
            for o in outputs:
                tokens[o.request_id].extend(o.new_token_ids)
        wall = time.perf_counter() - start
        return {
            "wall_s": wall,
            "output_tokens": sum(len(t) for t in tokens.values()),
            "prefill_s": kinds["prefill"][0],
            "prefill_tokens": kinds["prefill"][1],
            "prefill_steps": kinds["prefill"][2],
            "decode_s": kinds["decode"][0],
            "decode_tokens": kinds["decode"][1],
            "decode_steps": kinds["decode"][2],
            "mixed_s": kinds["mixed"][0],
            "mixed_tokens": kinds["mixed"][1],
            "mixed_steps": kinds["mixed"][2],
            "tokens": [tokens[f"r{rep}-{i}"] for i in range(len(prompts))],
        }

    runs = _timed_runs(opts["repeats"], run)
    stats = engine.stats()
    if stats.kv_blocks_used:
        raise RuntimeError(f"{stats.kv_blocks_used} KV blocks still in use after every request finished")
    metrics = {
        "wall_s": median([r["wall_s"] for r in runs]),
        "output_tokens": runs[0]["output_tokens"],
        "out_tok_s": median([r["output_tokens"] / r["wall_s"] for r in runs]),
        "prefill_tok_s": median([r["prefill_tokens"] / r["prefill_s"] for r in runs if r["prefill_s"]]),
        "decode_tok_s": median([r["decode_tokens"] / r["decode_s"] for r in runs if r["decode_s"]]),
    }
    return {
        "metrics": metrics,
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
        "tokens": runs[0]["tokens"],
        "setup_s": setup_s,
        "engine": {
            "policy": stats.policy,
            "kv_blocks": stats.kv_blocks_total,
            "block_size": stats.block_size,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "num_preemptions": stats.num_preemptions,
            "native_decode_kernel": native_available(),
            "model_dtype": str(next(model.parameters()).dtype),
        },
        "torch_threads": torch.get_num_threads(),
    }


def _derived_metrics(runs: list[dict[str, Any]], num_requests: int, prompt_tokens: int) -> dict[str, Any]:
    """Prefill and decode throughput from T(1 new token) and T(full), as research/feasibility.md §4 does."""

    def decode_rate(r: dict[str, Any], key: str) -> float:
        span = r["wall_s"] - r["first_s"]
        return r[key] / span if span > 0 else math.nan

    metrics = {
        "wall_s": median([r["wall_s"] for r in runs]),
        "first_token_s": median([r["first_s"] for r in runs]),
        "requests": num_requests,
        "output_tokens": runs[0]["output_tokens"],
        "out_tok_s": median([r["output_tokens"] / r["wall_s"] for r in runs]),
        "prefill_tok_s": median([prompt_tokens / r["first_s"] for r in runs]),
        "decode_tok_s": median([decode_rate(r, "decode_tokens") for r in runs]),
    }
    if "decode_tokens_computed" in runs[0]:
        metrics["decode_tok_s_computed"] = median([decode_rate(r, "decode_tokens_computed") for r in runs])
    return metrics


def worker_static(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from services.instance.models.loader import load_tokenizer

    opts = spec["options"]
    prompts: list[list[int]] = spec["prompts"]
    max_new: list[int] = spec["max_new"]
    model = _load(spec, "sdpa")
    tokenizer = load_tokenizer(spec["model_path"])
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    size = opts["hf_batch_size"] or len(prompts)
    batches = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]

    @torch.inference_mode()
    def generate(index: list[int], new: int) -> tuple[float, list[list[int]], int]:
        start = time.perf_counter()
        enc = tokenizer.pad({"input_ids": [prompts[i] for i in index]}, padding=True, return_tensors="pt")
        # min_new_tokens = max_new_tokens: EOS can't end the batch early, like ignore_eos on the other sides.
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id
        )
        elapsed = time.perf_counter() - start
        generated = out[:, enc["input_ids"].shape[1] :].tolist()
        return elapsed, generated, int(enc["input_ids"].numel())

    generate([0, min(1, len(prompts) - 1)], 3)  # warm-up, outside the timed runs

    def run(_rep: int) -> dict[str, Any]:
        first_s = wall_s = 0.0
        padded_prompt_tokens = computed = 0
        tokens: list[list[int]] = [[] for _ in prompts]
        for index in batches:
            first_s += generate(index, 1)[0]
        for index in batches:
            longest = max(max_new[i] for i in index)
            elapsed, generated, padded = generate(index, longest)
            wall_s += elapsed
            padded_prompt_tokens += padded
            computed += len(index) * (longest - 1)
            for row, i in enumerate(index):
                tokens[i] = generated[row][: max_new[i]]  # only the request's own tokens count
        own = sum(len(t) for t in tokens)
        return {
            "first_s": first_s,
            "wall_s": wall_s,
            "output_tokens": own,
            "decode_tokens": own - len(prompts),
            "decode_tokens_computed": computed,
            "padded_prompt_tokens": padded_prompt_tokens,
            "tokens": tokens,
        }

    runs = _timed_runs(opts["repeats"], run)
    return {
        "metrics": _derived_metrics(runs, len(prompts), sum(len(p) for p in prompts)),
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
        "tokens": runs[0]["tokens"],
        "batches": [len(b) for b in batches],
        "torch_threads": torch.get_num_threads(),
    }


def worker_cb(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    opts = spec["options"]
    prompts: list[list[int]] = spec["prompts"]
    max_new: list[int] = spec["max_new"]
    model = _load(spec, "sdpa")
    page = opts["cb_page_size"]
    # A spare page per request on top of its whole sequence: everything is resident at once, as for ecoserve.
    num_blocks = sum(math.ceil((len(p) + n) / page) + 1 for p, n in zip(prompts, max_new, strict=True))

    def cb_config(blocks: int, requests: int) -> ContinuousBatchingConfig:
        # Explicit sizing: with num_blocks/max_batch_tokens unset, CPU sizing claims 60 % of total RAM.
        return ContinuousBatchingConfig(
            page_size=page,
            num_blocks=blocks,
            max_batch_tokens=opts["cb_max_batch_tokens"],
            max_requests_per_batch=requests,
            max_memory_percent=0.5,  # only a ceiling check here, since the sizes above are fixed
            safety_margin=0.0,  # the default 0.15 would hold prompts back although the cache fits them all
            allow_block_sharing=False,  # random prompts share no prefix; ecoserve has no prefix cache either
            use_cuda_graph=False,
            use_async_batching=False,
        )

    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(max_new), eos_token_id=-1)
    if model.generation_config.pad_token_id is not None:
        gen_config.pad_token_id = model.generation_config.pad_token_id

    @torch.inference_mode()
    def session(
        config: ContinuousBatchingConfig, inputs: list[list[int]], news: list[int]
    ) -> tuple[float, float, list[list[int]], dict[str, Any]]:
        setup = time.perf_counter()
        # warmup=False: it pre-captures CUDA graphs; on CPU our own small session does the warming.
        with model.continuous_batching_context_manager(
            generation_config=gen_config,
            continuous_batching_config=config,
            block=True,
            timeout=60,
            warmup=False,
        ) as manager:
            # The background thread allocates the KV cache on start; keep that out of the timing, as the
            # engine's pool allocation is kept out of ecoserve's.
            while manager.batch_processor is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching thread died while building its cache")
                time.sleep(0.005)
            start = time.perf_counter()
            for i, (prompt, n) in enumerate(zip(inputs, news, strict=True)):
                # Per-request max_new_tokens and no EOS: generate_batch can express neither.
                manager.add_request(prompt, request_id=f"req_{i}", max_new_tokens=n, eos_token_id=-1)
            results: dict[str, Any] = {}
            while len(results) < len(inputs):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("the continuous batching thread died")
                    continue
                if result.is_finished():
                    results[result.request_id] = result
            elapsed = time.perf_counter() - start
            # What the manager actually built from the config (it rounds the cache to whole sectors).
            resolved = manager.continuous_batching_config
            processor = manager.batch_processor
            effective = {
                "num_blocks": resolved.num_blocks,
                "max_batch_tokens": resolved.max_batch_tokens,
                "max_requests_per_batch": resolved.max_requests_per_batch,
                "cache_mb": processor.cache.cache_tensor.numel() / 2**20 if processor else None,
            }
        failed = {rid: r.error for rid, r in results.items() if r.error is not None}
        if failed:
            raise RuntimeError(f"continuous batching requests failed: {failed}")
        tokens = [list(results[f"req_{i}"].generated_tokens) for i in range(len(inputs))]
        return start - setup, elapsed, tokens, effective

    # Warm-up on two short requests with its own small cache, outside the timed runs.
    warm_inputs = [p[:32] for p in prompts[:2]]
    warm_blocks = sum(math.ceil((len(p) + 4) / page) + 1 for p in warm_inputs)
    session(cb_config(warm_blocks, len(warm_inputs)), warm_inputs, [4] * len(warm_inputs))
    config = cb_config(num_blocks, len(prompts))

    def run(_rep: int) -> dict[str, Any]:
        _, first_s, _, _ = session(config, prompts, [1] * len(prompts))
        setup_s, wall_s, tokens, effective = session(config, prompts, max_new)
        own = sum(len(t) for t in tokens)
        return {
            "first_s": first_s,
            "wall_s": wall_s,
            "setup_s": setup_s,
            "output_tokens": own,
            "decode_tokens": own - len(prompts),
            "effective_cb_config": effective,
            "tokens": tokens,
        }

    runs = _timed_runs(opts["repeats"], run)
    return {
        "metrics": _derived_metrics(runs, len(prompts), sum(len(p) for p in prompts)),
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
        "tokens": runs[0]["tokens"],
        "cb_config": {
            "page_size": page,
            "num_blocks": num_blocks,
            "max_batch_tokens": opts["cb_max_batch_tokens"],
            "max_requests_per_batch": len(prompts),
            "attn_implementation": model.config._attn_implementation,
        },
        "torch_threads": torch.get_num_threads(),
    }


def worker_decode_step(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    from services.instance.engine.attention import ATTENTION_NAME
    from services.instance.engine.kernels import native_available
    from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
    from services.instance.engine.sampling_params import SamplingParams

    opts = spec["options"]
    batch, ctx = opts["decode_batch"], opts["decode_ctx"]
    warmup, steps = opts["decode_warmup"], opts["decode_steps"]
    prompts: list[list[int]] = spec["prompts"]
    bs = opts["block_size"]
    # Enough new tokens that no sequence finishes (and leaves the batch) before the last timed step.
    new = warmup + steps + 2
    eco_model = _load(spec, ATTENTION_NAME)
    engine = LLMEngine(
        eco_model,
        eos_token_ids_of(eco_model),
        EngineConfig(
            policy="nodg",
            block_size=bs,
            num_kv_blocks=batch * math.ceil((ctx + new) / bs) + 1,
            max_num_seqs=batch,
            max_num_batched_tokens=max(4096, ctx),
        ),
    )
    for i, prompt in enumerate(prompts):
        engine.add_request(f"d{i}", prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    prefilled = 0
    while prefilled < batch:  # nodg: prefill steps until every sequence has its first token
        prefilled += sum(1 for o in engine.step() if o.num_output_tokens == 1)

    hf_model = _load(spec, "sdpa")
    with torch.inference_mode():
        cache = DynamicCache(config=hf_model.config)
        out = hf_model(
            input_ids=torch.tensor(prompts), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)

    eco_ms: list[float] = []
    hf_ms: list[float] = []
    meter = CpuMeter()
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        outputs = engine.step()
        eco_ms.append((time.perf_counter() - t0) * 1e3)
        if len(outputs) != batch or any(o.num_output_tokens == 1 for o in outputs):
            raise RuntimeError("the engine step was not a pure decode of the whole batch")
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = hf_model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            hf_ms.append((time.perf_counter() - t0) * 1e3)
    load = meter.stop()
    eco, hf = median(eco_ms[warmup:]), median(hf_ms[warmup:])
    return {
        "metrics": {"ecoserve_ms": eco, "hf_ms": hf, "ratio": eco / hf},
        "ecoserve_step_ms": eco_ms,
        "hf_step_ms": hf_ms,
        "context_at_first_step": ctx + 1,
        **load,
        "native_decode_kernel": native_available(),
        "torch_threads": torch.get_num_threads(),
    }


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ecoserve": worker_ecoserve,
    "static": worker_static,
    "cb": worker_cb,
    "decode_step": worker_decode_step,
}


def worker_main(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    import torch

    # Before transformers or the models are imported and before any op runs, so every pool gets this size.
    torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = WORKERS[spec["method"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    out_path.write_text(json.dumps(result))


# -- parent --------------------------------------------------------------------------------------------------


def spawn(method: str, spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; an error (or OOM kill) becomes {"error": ...}."""
    spec_path = workdir / f"{method}-spec.json"
    out_path = workdir / f"{method}-out.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "method": method}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(spec_path),
        "--worker-out",
        str(out_path),
    ]
    before = loadavg()
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "loadavg_before_process": before}
    elapsed = time.perf_counter() - started
    meta = {"process_s": elapsed, "loadavg_before_process": before, "loadavg_after_process": loadavg()}
    if done.returncode != 0 or not out_path.exists():
        how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return {"error": f"{how}: {tail}", **meta}
    # Warnings the method printed (e.g. transformers' continuous batching) are kept for the record.
    stderr_tail = done.stderr.strip().splitlines()[-20:]
    return {**json.loads(out_path.read_text()), **meta, "stderr_tail": stderr_tail}


def compare_tokens(
    first: list[list[int]], second: list[list[int]], count: int, eos: set[int]
) -> dict[str, Any]:
    details = []
    for a, b in zip(first[:count], second[:count], strict=False):
        diverge = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if diverge is None and len(a) != len(b):
            diverge = min(len(a), len(b))
        at_mismatch = set() if diverge is None else {*a[diverge : diverge + 1], *b[diverge : diverge + 1]}
        details.append(
            {
                "match": diverge is None,
                "first_mismatch": diverge,
                "length": len(a),
                # static generate's min_new_tokens masks EOS; ecoserve's ignore_eos and cb's eos=-1 don't.
                "eos_at_mismatch": bool(at_mismatch & eos),
            }
        )
    return {"matches": sum(d["match"] for d in details), "checked": len(details), "details": details}


def eos_ids(path: Path) -> set[int]:
    config_path = path / "generation_config.json"
    eos = json.loads(config_path.read_text()).get("eos_token_id") if config_path.exists() else None
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def e2e_row_line(row: dict[str, Any]) -> str:
    m = row.get("metrics", {})
    head = f"{row['model']:<18} {row['prompts']:>3} {row['method']:<9}"
    if "error" in row:
        return f"{head} ERROR {row['error'].splitlines()[0][:80]}"
    vs = row.get("ecoserve_vs", {})
    return (
        f"{head} {fmt(m.get('wall_s'), 2):>8} {fmt(m.get('out_tok_s')):>8} {fmt(m.get('prefill_tok_s')):>9} "
        f"{fmt(m.get('decode_tok_s')):>8} {fmt(row.get('peak_rss_mb'), 0):>7} "
        f"{fmt(vs.get('out_tok_s'), 2):>6} {fmt(vs.get('prefill_tok_s'), 2):>6} "
        f"{fmt(vs.get('decode_tok_s'), 2):>6} {fmt(row.get('background_cores'), 2):>5} "
        f"{row.get('load1_before') or '-':>5}"
    )


E2E_HEADER = (
    f"{'model':<18} {'N':>3} {'method':<9} {'wall s':>8} {'out t/s':>8} {'pre t/s':>9} {'dec t/s':>8} "
    f"{'RSS MB':>7} {'eco/x':>6} {'pre':>6} {'dec':>6} {'bg':>5} {'load1':>5}"
)


def worst_background(runs: list[dict[str, Any]]) -> float | None:
    values = [r["background_cores"] for r in runs if r.get("background_cores") is not None]
    return max(values) if values else None


def run_e2e(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    prompt_len, new_tokens = parse_range(sizes.prompt_len), parse_range(sizes.new_tokens)
    counts = [int(x) for x in sizes.prompts.split(",")]
    options = {
        "policy": args.policy,
        "block_size": args.block_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "hf_batch_size": args.hf_batch_size,
        "cb_page_size": args.cb_page_size,
        "cb_max_batch_tokens": args.cb_max_batch_tokens,
        "repeats": args.repeats,
    }
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    print(E2E_HEADER)
    print("-" * len(E2E_HEADER), flush=True)
    for model_spec in sizes.models.split(","):
        name, dtype = parse_model(model_spec)
        label = f"{name}:{dtype}"
        path = model_path(name, dtype)
        for n in counts:
            workload = make_workload(path, n, args.seed, prompt_len, new_tokens)
            spec = {
                "model_path": str(path),
                "dtype": dtype,
                "threads": args.threads,
                "prompts": workload.prompts,
                "max_new": workload.max_new,
                "options": options,
            }
            results: dict[str, dict[str, Any]] = {}
            for method in methods:
                result = spawn(method, spec, workdir, args.timeout)
                results[method] = result
                runs = result.get("runs") or [{}]
                load = runs[0].get("loadavg_before") or result.get("loadavg_before_process") or ""
                row = {
                    "model": label,
                    "prompts": n,
                    "method": method,
                    "prompt_tokens": workload.prompt_tokens,
                    "requested_output_tokens": workload.output_tokens,
                    "background_cores": worst_background(runs),
                    "load1_before": load.split()[0] if load else None,
                    **{k: v for k, v in result.items() if k != "tokens"},
                }
                rows.append(row)
                if method != "ecoserve" and "ecoserve" in results and "error" not in results["ecoserve"]:
                    eco = results["ecoserve"]["metrics"]
                    row["ecoserve_vs"] = {
                        key: ratio(eco.get(key), result.get("metrics", {}).get(key))
                        for key in ("out_tok_s", "prefill_tok_s", "decode_tok_s")
                    }
                print(e2e_row_line(row), flush=True)
            comparisons.append(compare(label, n, results, path, args.check_requests, workload))
    print(
        "# eco/x, pre, dec: ecoserve's end-to-end, prefill and decode tok/s divided by this method's (>1: "
        "ecoserve faster); bg: cores used by other processes during the timed runs (max); load1: 1-min load "
        "average before"
    )
    print()
    for c in comparisons:
        for pair, check in c["greedy"].items():
            flipped = [d["first_mismatch"] for d in check["details"] if not d["match"]]
            eos_flag = any(d["eos_at_mismatch"] for d in check["details"])
            note = f" (first mismatch at token {flipped}{'; an EOS is involved' if eos_flag else ''})"
            print(
                f"greedy check {c['model']} N={c['prompts']}: {pair.replace('~', ' == ')} for "
                f"{check['matches']}/{check['checked']} requests{note if flipped else ''}"
            )
    return {"options": options, "rows": rows, "comparisons": comparisons}


def compare(
    label: str, n: int, results: dict[str, dict[str, Any]], path: Path, count: int, workload: Workload
) -> dict[str, Any]:
    ok = {m: r for m, r in results.items() if "error" not in r}
    out: dict[str, Any] = {
        "model": label,
        "prompts": n,
        "prompt_lens": [len(p) for p in workload.prompts],
        "max_new": workload.max_new,
        "greedy": {},
    }
    for method, res in ok.items():
        if res["metrics"]["output_tokens"] != workload.output_tokens:
            out.setdefault("token_count_mismatch", {})[method] = res["metrics"]["output_tokens"]
    eos = eos_ids(path)
    if "ecoserve" in ok:
        for other in ("static", "cb"):
            if other in ok:
                out[f"ecoserve_vs_{other}"] = {
                    key: ratio(ok["ecoserve"]["metrics"].get(key), ok[other]["metrics"].get(key))
                    for key in ("out_tok_s", "prefill_tok_s", "decode_tok_s")
                }
    # static~cb calibrates the other two: how often two HF code paths disagree at this dtype.
    for a, b in (("ecoserve", "static"), ("ecoserve", "cb"), ("static", "cb")):
        if a in ok and b in ok:
            out["greedy"][f"{a}~{b}"] = compare_tokens(ok[a]["tokens"], ok[b]["tokens"], count, eos)
    return out


def run_decode_step(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    options = {
        "decode_batch": sizes.decode_batch,
        "decode_ctx": sizes.decode_ctx,
        "decode_steps": sizes.decode_steps,
        "decode_warmup": args.decode_warmup,
        "block_size": args.block_size,
    }
    header = (
        f"{'model':<18} {'B':>3} {'ctx':>4} | {'ecoserve ms':>11} {'HF ms':>8} {'ratio':>6} "
        f"| bar ≤ {DECODE_STEP_BAR}"
    )
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for model_spec in sizes.models.split(","):
        name, dtype = parse_model(model_spec)
        path = model_path(name, dtype)
        workload = make_workload(path, sizes.decode_batch, args.seed, (sizes.decode_ctx,) * 2, (1, 1))
        spec = {
            "model_path": str(path),
            "dtype": dtype,
            "threads": args.threads,
            "prompts": workload.prompts,
            "options": options,
        }
        result = spawn("decode_step", spec, workdir, args.timeout)
        row = {"model": f"{name}:{dtype}", **options, **result}
        rows.append(row)
        head = f"{row['model']:<18} {sizes.decode_batch:>3} {sizes.decode_ctx:>4} |"
        if "error" in result:
            print(f"{head} ERROR {result['error'].splitlines()[0][:80]}", flush=True)
            continue
        m = result["metrics"]
        row["passes_bar"] = m["ratio"] <= DECODE_STEP_BAR
        verdict = "PASS" if row["passes_bar"] else "FAIL"
        print(
            f"{head} {m['ecoserve_ms']:>11.2f} {m['hf_ms']:>8.2f} {m['ratio']:>6.3f} | {verdict}"
            f"  bg {fmt(result.get('background_cores'), 2)} cores, load {result['loadavg_before']}",
            flush=True,
        )
    return {"options": options, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated; default {FULL.models} ({QUICK.models} with --quick)")
    p.add_argument("--prompts", help=f"request counts; default {FULL.prompts} ({QUICK.prompts} with --quick)")
    p.add_argument("--prompt-len", help=f"LO,HI prompt tokens; default {FULL.prompt_len}")
    p.add_argument("--new-tokens", help=f"LO,HI new tokens per request; default {FULL.new_tokens}")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every measurement (default 2)")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of ecoserve,static,cb")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument(
        "--json", type=Path, help=f"default {DEFAULT_JSON} ({DEFAULT_DECODE_JSON} with --decode-step)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method; medians are reported")
    p.add_argument(
        "--policy",
        default="nodg",
        help="ecoserve policy; prefill/decode tok/s come from pure steps only (most sarathi steps mix)",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="ecoserve step token budget")
    p.add_argument("--block-size", type=int, default=16, help="ecoserve KV block size")
    p.add_argument("--hf-batch-size", type=int, default=0, help="static generate sub-batch (0: one batch)")
    p.add_argument("--cb-page-size", type=int, default=64)
    p.add_argument("--cb-max-batch-tokens", type=int, default=2048)
    p.add_argument("--check-requests", type=int, default=4, help="requests whose greedy tokens are compared")
    p.add_argument("--decode-step", action="store_true", help="run the decode-step comparison instead")
    p.add_argument("--decode-batch", type=int)
    p.add_argument("--decode-ctx", type=int)
    p.add_argument("--decode-steps", type=int, help="timed steps (median reported)")
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement process")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    return Sizes(
        models=args.models or base.models,
        prompts=args.prompts or base.prompts,
        prompt_len=args.prompt_len or base.prompt_len,
        new_tokens=args.new_tokens or base.new_tokens,
        decode_batch=args.decode_batch or base.decode_batch,
        decode_ctx=args.decode_ctx or base.decode_ctx,
        decode_steps=args.decode_steps or base.decode_steps,
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return
    import torch
    import transformers

    sizes = resolve_sizes(args)
    json_path = args.json or (DEFAULT_DECODE_JSON if args.decode_step else DEFAULT_JSON)
    meta = {
        "mode": "decode_step" if args.decode_step else "e2e",
        "argv": sys.argv[1:],
        "sizes": vars(sizes),
        "threads": args.threads,
        "seed": args.seed,
        "quick": args.quick,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
    }
    print(
        f"# {meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, "
        f"transformers {meta['transformers']}, "
        f"{args.threads} threads, commit {(meta['git']['commit'] or '?')[:10]}; load {meta['loadavg_start']}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ecoserve-bench-") as tmp:
        if args.decode_step:
            body = run_decode_step(args, sizes, Path(tmp))
        else:
            body = run_e2e(args, sizes, Path(tmp))
    meta["loadavg_end"] = loadavg()
    background = [r["background_cores"] for r in body["rows"] if r.get("background_cores") is not None]
    meta["max_background_cores"] = max(background) if background else None
    if background and max(background) > BACKGROUND_WARN_CORES:
        print(
            f"# WARNING: other processes used up to {max(background):.2f} cores during the timed runs; "
            "on this 2-core box that makes the numbers unreliable (re-run when the machine is quiet)"
        )
    meta["total_s"] = time.perf_counter() - started
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, **body}, indent=1) + "\n")
    print(f"# done in {meta['total_s']:.0f} s; load {meta['loadavg_end']}; wrote {json_path}")


if __name__ == "__main__":
    main()
