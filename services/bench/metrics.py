"""Per-request metrics and run aggregates, with `vllm bench serve`'s definitions.

- TTFT, E2E: measured by the client (client.py).
- TPOT = (E2E − TTFT) / (output_tokens − 1), for successful requests with more than one output token; its
  statistics are over requests (request-weighted), while ITL's are over all chunks of all requests.
- SLO attainment = the share of *all* requests (failed ones count as misses) with TTFT ≤ SLO_TTFT and
  TPOT ≤ SLO_TPOT, where a one-token request's TPOT is 0.
- Throughputs divide by the run's duration; `good_request_throughput` is vLLM's "request goodput" (requests
  meeting the SLOs per second), not the rate-search goodput of search.py.
Percentiles interpolate linearly (numpy's default, as vLLM).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.bench.client import RequestResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    ttft: float  # seconds
    tpot: float  # seconds


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first; None for failures and one-token requests."""
    if not result.success or result.output_tokens <= 1:
        return None
    return (result.e2e - result.ttft) / (result.output_tokens - 1)


def meets_slo(result: RequestResult, slo: SLO) -> bool:
    if not result.success:
        return False
    per_token = tpot(result)
    return result.ttft <= slo.ttft and (0.0 if per_token is None else per_token) <= slo.tpot


def attainment(results: Sequence[RequestResult], slo: SLO) -> float:
    return sum(meets_slo(r, slo) for r in results) / len(results) if results else 0.0


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, std, median, p90, p99 (and min/max) in seconds; all None when there are no values."""
    keys = ("mean", "std", "median", "p90", "p99", "min", "max")
    if not values:
        return dict.fromkeys(keys)
    array = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(array, PERCENTILES)
    stats = (array.mean(), array.std(), p50, p90, p99, array.min(), array.max())
    return {key: float(value) for key, value in zip(keys, stats, strict=True)}


def error_counts(results: Sequence[RequestResult]) -> dict[str, int]:
    return dict(Counter(r.error for r in results if not r.success).most_common())


def summarize(results: Sequence[RequestResult], duration: float, slo: SLO) -> dict[str, Any]:
    """The aggregates of one run (JSON-ready; times in seconds)."""
    ok = [r for r in results if r.success]
    good = sum(meets_slo(r, slo) for r in results)
    input_tokens = sum((r.prompt_tokens if r.prompt_tokens is not None else r.input_len or 0) for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": error_counts(results),
        "duration_s": duration,
        "attainment": attainment(results, slo),
        "good_requests": good,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_second(len(ok)),
        "good_request_throughput": per_second(good),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "ttft": distribution([r.ttft for r in ok]),
        "tpot": distribution([t for r in ok if (t := tpot(r)) is not None]),
        "itl": distribution([gap for r in ok for gap in r.itl]),
        "e2e": distribution([r.e2e for r in ok]),
        "queue_delay": distribution([r.sent - r.scheduled for r in results]),
    }


def request_record(result: RequestResult, slo: SLO) -> dict[str, Any]:
    """One request's row in the JSON report."""
    return {
        "index": result.index,
        "scheduled_s": result.scheduled,
        "sent_s": result.sent,
        "input_len": result.input_len,
        "prompt_tokens": result.prompt_tokens,
        "output_len": result.output_len,
        "output_tokens": result.output_tokens,
        "usage_reported": result.usage_reported,
        "success": result.success,
        "error": result.error or None,
        "ttft_s": result.ttft if result.success else None,
        "tpot_s": tpot(result),
        "e2e_s": result.e2e if result.success else None,
        "itl_s": result.itl,
        "meets_slo": meets_slo(result, slo),
    }
