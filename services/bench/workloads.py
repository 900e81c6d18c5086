"""Benchmark workloads: how many prompt tokens and output tokens each request of a run has.

Synthetic workloads are shaped like the three datasets of the EcoServe evaluation (research/ecoserve.md §7):

| name      | dataset: paper means (in / out) | scale | scaled means   | SLOs: TTFT, TPOT |
|-----------|---------------------------------|-------|----------------|------------------|
| alpaca    | Alpaca-gpt4: 20.63 / 163.80     | 0.25  | ≈5.2 / ≈41.0   | 1 s, 100 ms      |
| sharegpt  | ShareGPT: 343.76 / 237.20       | 0.25  | ≈85.9 / ≈59.3  | 5 s, 100 ms      |
| longbench | LongBench: 2686.89 / 101.78     | 0.125 | ≈335.9 / ≈12.7 | 15 s, 100 ms     |

Scaling. The paper serves 30B–72B models on GPUs; here a 2-core CPU serves a 135M model at ~1,100 prefill
and ~200 decode tokens/s, so at paper lengths one LongBench prompt alone takes ~2.5 s to prefill and the
sustainable rate is a fraction of a request per second. Each workload is therefore scaled by one factor for
both lengths (means and bounds alike), which keeps what distinguishes the workloads — the input:output ratio
(1:8 short-in/long-out, ≈1.5:1 balanced, ≈26:1 long-in/short-out) — and shrinks the work per request so a
rate sweep reaches the server's limit within seconds. `--scale`, `--input-scale` and `--output-scale`
override the defaults; the scale used is recorded in the JSON (`config.workload`). SLOs are the paper's.

Shape. The papers report only means. Each length is drawn from a lognormal clipped to [low, high]; the
spreads (sigma) and bounds below are our assumptions, chosen to resemble the public datasets (ShareGPT's
heavy prompt tail, LongBench's concentrated long documents). The lognormal's mu is solved so that the mean
of the *clipped* distribution equals the target, so the bounds do not bias the mean.

Draws are seeded and per-stream (input and output lengths come from separate generators), so the first n
requests of a workload are the same whatever the run's length: every run of a rate search sends the same
requests, and differences between runs come from the rate, not from sampling noise.

A JSONL file works too: one object per line with `prompt` (text or a list of token ids) or
`prompt_token_ids`, and `max_tokens` or `output_len`; its requests are sent in file order, cycled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Prompt = str | list[int]


@dataclass(frozen=True)
class RequestSpec:
    """One request's shape; `prompt` is None when the prompt is to be made to measure (prompts.py)."""

    input_len: int | None  # None: a text prompt from a file whose token count is unknown here
    output_len: int
    prompt: Prompt | None = None


class Workload(Protocol):
    name: str

    def requests(self, n: int) -> list[RequestSpec]:
        """The first n requests (the same prefix for every n)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the JSON report records about this workload."""
        ...


class WorkloadError(ValueError):
    """A workload that cannot be built: unknown name, bad scale, or a malformed JSONL line."""


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[min(max(X, low), high)] for X ~ LogNormal(mu, sigma), in closed form."""
    a = (math.log(low) - mu) / sigma
    b = (math.log(high) - mu) / sigma
    inside = math.exp(mu + sigma * sigma / 2) * (_phi(b - sigma) - _phi(a - sigma))
    return low * _phi(a) + inside + high * (1.0 - _phi(b))


@dataclass(frozen=True)
class LengthDist:
    """A clipped lognormal over token counts with a given mean."""

    mean: float
    sigma: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.mean <= self.high:
            raise WorkloadError(f"need 1 <= low <= mean <= high, got {self.low}, {self.mean}, {self.high}")
        if self.sigma <= 0:
            raise WorkloadError(f"sigma must be positive, got {self.sigma}")

    def scaled(self, factor: float) -> LengthDist:
        low = max(1, round(self.low * factor))
        high = max(low, round(self.high * factor))
        return LengthDist(min(max(self.mean * factor, low), high), self.sigma, low, high)

    def mu(self) -> float:
        """The lognormal mu whose clipped mean is `mean` (the clipped mean increases with mu: bisection)."""
        if self.low == self.high:
            return math.log(self.low)
        lo, hi = math.log(self.low) - 12 * self.sigma, math.log(self.high) + 12 * self.sigma
        for _ in range(200):
            mid = (lo + hi) / 2
            if clipped_lognormal_mean(mid, self.sigma, self.low, self.high) < self.mean:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        draws = rng.lognormal(self.mu(), self.sigma, n)
        return [int(x) for x in np.clip(np.rint(draws), self.low, self.high)]

    def describe(self) -> dict[str, Any]:
        return {"mean": self.mean, "sigma": self.sigma, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class DatasetShape:
    """A dataset's lengths at paper scale, the scale we serve it at here, and the paper's SLOs (seconds)."""

    name: str
    dataset: str
    input: LengthDist
    output: LengthDist
    default_scale: float
    slo_ttft: float
    slo_tpot: float


DATASETS: dict[str, DatasetShape] = {
    "alpaca": DatasetShape(
        name="alpaca",
        dataset="Alpaca-gpt4 (short in, long out)",
        input=LengthDist(mean=20.63, sigma=0.6, low=4, high=256),
        output=LengthDist(mean=163.80, sigma=0.7, low=4, high=1024),
        default_scale=0.25,
        slo_ttft=1.0,
        slo_tpot=0.1,
    ),
    "sharegpt": DatasetShape(
        name="sharegpt",
        dataset="ShareGPT (balanced)",
        input=LengthDist(mean=343.76, sigma=1.1, low=4, high=2048),
        output=LengthDist(mean=237.20, sigma=0.9, low=4, high=1024),
        default_scale=0.25,
        slo_ttft=5.0,
        slo_tpot=0.1,
    ),
    "longbench": DatasetShape(
        name="longbench",
        dataset="LongBench (long in, short out; summarization)",
        input=LengthDist(mean=2686.89, sigma=0.5, low=512, high=8192),
        output=LengthDist(mean=101.78, sigma=0.6, low=8, high=512),
        default_scale=0.125,
        slo_ttft=15.0,
        slo_tpot=0.1,
    ),
}


class SyntheticWorkload:
    """Seeded lengths from a dataset shape at the given input and output scales."""

    def __init__(
        self,
        shape: DatasetShape,
        *,
        input_scale: float | None = None,
        output_scale: float | None = None,
        seed: int = 0,
    ):
        self.shape = shape
        self.name = shape.name
        self.input_scale = shape.default_scale if input_scale is None else input_scale
        self.output_scale = shape.default_scale if output_scale is None else output_scale
        for label, value in (("input scale", self.input_scale), ("output scale", self.output_scale)):
            if not value > 0:
                raise WorkloadError(f"{label} must be positive, got {value}")
        self.input = shape.input.scaled(self.input_scale)
        self.output = shape.output.scaled(self.output_scale)
        self.seed = seed

    def requests(self, n: int) -> list[RequestSpec]:
        # Separate streams, so request i's lengths do not depend on n.
        in_seq, out_seq = np.random.SeedSequence([self.seed, 0x1E]).spawn(2)
        inputs = self.input.sample(np.random.default_rng(in_seq), n)
        outputs = self.output.sample(np.random.default_rng(out_seq), n)
        return [RequestSpec(i, o) for i, o in zip(inputs, outputs, strict=True)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": "synthetic",
            "dataset": self.shape.dataset,
            "distribution": "lognormal clipped to [low, high], mu solved for the clipped mean",
            "paper_mean_input": self.shape.input.mean,
            "paper_mean_output": self.shape.output.mean,
            "input_scale": self.input_scale,
            "output_scale": self.output_scale,
            "input": self.input.describe(),
            "output": self.output.describe(),
            "seed": self.seed,
        }


def _positive_int(obj: dict[str, Any], names: tuple[str, ...], where: str) -> int:
    for name in names:
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WorkloadError(f"{where}: '{name}' must be a positive integer, got {value!r}")
        return value
    raise WorkloadError(f"{where}: one of {', '.join(repr(n) for n in names)} is required")


def parse_request_line(line: str, where: str) -> RequestSpec:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object")
    output_len = _positive_int(obj, ("max_tokens", "output_len"), where)
    prompt = obj.get("prompt_token_ids", obj.get("prompt"))
    if isinstance(prompt, str) and prompt:
        return RequestSpec(None, output_len, prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return RequestSpec(len(prompt), output_len, list(prompt))
    raise WorkloadError(
        f"{where}: 'prompt' must be a non-empty string or 'prompt_token_ids' a non-empty list of token ids"
    )


class FileWorkload:
    """Requests from a JSONL file, in file order, cycled when a run needs more than the file holds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise WorkloadError(f"cannot read {path}: {exc.strerror or exc}") from None
        self.pool = [
            parse_request_line(line, f"{self.path.name}:{number}")
            for number, line in enumerate(lines, 1)
            if line.strip()
        ]
        if not self.pool:
            raise WorkloadError(f"{path} holds no requests")

    def requests(self, n: int) -> list[RequestSpec]:
        return [self.pool[i % len(self.pool)] for i in range(n)]

    def describe(self) -> dict[str, Any]:
        known = [r.input_len for r in self.pool if r.input_len is not None]
        return {
            "name": self.name,
            "source": str(self.path),
            "requests_in_file": len(self.pool),
            "input_scale": 1.0,
            "output_scale": 1.0,
            "mean_input": sum(known) / len(known) if known else None,
            "mean_output": sum(r.output_len for r in self.pool) / len(self.pool),
        }


def load_workload(
    name_or_path: str,
    *,
    input_scale: float | None = None,
    output_scale: float | None = None,
    seed: int = 0,
) -> Workload:
    """A named synthetic workload (alpaca, sharegpt, longbench) or a JSONL file (scales apply to neither)."""
    shape = DATASETS.get(name_or_path)
    if shape is not None:
        return SyntheticWorkload(shape, input_scale=input_scale, output_scale=output_scale, seed=seed)
    if name_or_path.endswith(".jsonl") or Path(name_or_path).is_file():
        if input_scale is not None or output_scale is not None:
            raise WorkloadError("--scale, --input-scale and --output-scale apply to synthetic workloads only")
        return FileWorkload(name_or_path)
    raise WorkloadError(f"unknown workload {name_or_path!r}: use {', '.join(DATASETS)} or a .jsonl file")
