"""Metrics with vLLM's definitions, checked against hand-computed values on synthetic timings."""

from __future__ import annotations

import pytest

from services.bench.client import RequestResult
from services.bench.metrics import SLO, attainment, distribution, meets_slo, request_record, summarize, tpot

SLO_ = SLO(ttft=0.4, tpot=0.1)


def done(
    index: int, ttft: float, e2e: float, tokens: int, itl: list[float], prompt: int = 10
) -> RequestResult:
    return RequestResult(
        index,
        input_len=prompt,
        output_len=tokens,
        scheduled=index * 0.5,
        sent=index * 0.5 + 0.01,
        success=True,
        ttft=ttft,
        e2e=e2e,
        itl=itl,
        prompt_tokens=prompt,
        output_tokens=tokens,
        usage_reported=True,
    )


@pytest.fixture
def results() -> list[RequestResult]:
    return [
        done(0, ttft=0.1, e2e=0.2, tokens=4, itl=[0.02, 0.03, 0.05]),  # TPOT 0.1/3: meets both
        done(1, ttft=0.5, e2e=0.5, tokens=1, itl=[]),  # one token (TPOT 0) but TTFT too slow
        RequestResult(2, 10, 8, scheduled=1.0, sent=1.01, error="HTTP 503: busy"),  # a failure is a miss
        done(3, ttft=0.2, e2e=0.6, tokens=3, itl=[0.2, 0.2]),  # TPOT 0.2: too slow
        done(4, ttft=0.3, e2e=0.3, tokens=1, itl=[]),  # one token, fast: meets (TPOT counts as 0)
    ]


def test_tpot_per_request(results):
    assert tpot(results[0]) == pytest.approx(0.1 / 3)
    assert tpot(results[1]) is None  # one token: no TPOT sample
    assert tpot(results[2]) is None  # failed
    assert tpot(results[3]) == pytest.approx(0.2)


def test_attainment_counts_both_slos_and_failures_as_misses(results):
    assert [meets_slo(r, SLO_) for r in results] == [True, False, False, False, True]
    assert attainment(results, SLO_) == pytest.approx(2 / 5)
    assert attainment(results, SLO(ttft=1.0, tpot=1.0)) == pytest.approx(4 / 5)
    assert attainment([], SLO_) == 0.0


def test_summary_by_hand(results):
    s = summarize(results, duration=2.0, slo=SLO_)
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["errors"] == {"HTTP 503: busy": 1}
    assert s["good_requests"] == 2
    assert s["total_output_tokens"] == 4 + 1 + 3 + 1
    assert s["total_input_tokens"] == 40
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["good_request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(24.5)
    # TTFT over the 4 successes [0.1, 0.5, 0.2, 0.3]: linear-interpolated percentiles.
    assert s["ttft"]["mean"] == pytest.approx(0.275)
    assert s["ttft"]["median"] == pytest.approx(0.25)
    assert s["ttft"]["p90"] == pytest.approx(0.3 + 0.7 * 0.2)
    assert s["ttft"]["p99"] == pytest.approx(0.3 + 0.97 * 0.2)
    # TPOT only over requests with more than one token, weighted per request.
    assert s["tpot"]["mean"] == pytest.approx((0.1 / 3 + 0.2) / 2)
    # ITL pooled over chunks: 3 + 2 samples.
    assert s["itl"]["mean"] == pytest.approx((0.02 + 0.03 + 0.05 + 0.2 + 0.2) / 5)
    assert s["itl"]["max"] == pytest.approx(0.2)
    assert s["e2e"]["median"] == pytest.approx(0.4)
    assert s["queue_delay"]["mean"] == pytest.approx(0.01)


def test_distribution_of_nothing_is_all_none():
    assert set(distribution([]).values()) == {None}


def test_request_record(results):
    record = request_record(results[0], SLO_)
    assert record["tpot_s"] == pytest.approx(0.1 / 3)
    assert record["meets_slo"] is True and record["error"] is None
    failed = request_record(results[2], SLO_)
    assert failed["success"] is False and failed["error"] == "HTTP 503: busy"
    assert failed["ttft_s"] is None and failed["e2e_s"] is None and failed["meets_slo"] is False
