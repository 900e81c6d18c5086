"""The benchmark's outputs: the JSON document and the printed tables.

JSON (times in seconds, rates in requests/s):
    schema        "ecoserve-bench/1"
    created       ISO-8601 UTC time the report was written
    config        the command's settings: url, api, model, workload (with its scaling), slo, attainment
                  target, burstiness, duration / num_requests, max_concurrency, seed, search settings,
                  nats (url and prefix, or null)
    runs[]        one per rate run: rate, burstiness, seed, started_at (Unix time), the aggregates of
                  metrics.summarize (num_requests, completed, failed, errors, duration_s, attainment,
                  good_requests, throughputs, and ttft / tpot / itl / e2e / queue_delay distributions with
                  mean, std, median, p90, p99, min, max), and requests[] (metrics.request_record: index,
                  scheduled_s, sent_s, input_len, prompt_tokens, output_len, output_tokens, usage_reported,
                  success, error, ttft_s, tpot_s, e2e_s, itl_s[], meets_slo)
                  and, with --nats, phases[] (phases.py: t, instance, phase, prefill_window, epoch — the
                  transitions within the run, each instance's state at its start at t = 0)
    attainment    the single run's attainment, or with --search the attainment at the goodput rate
    search        with --search: target_attainment, the ramp/bisection settings, runs[] (rate, attainment,
                  passed), goodput_rps, lowest_failing_rate, bracketed; otherwise null
    goodput_rps   with --search: the highest rate that met the target (0 if none did); otherwise null
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.bench.metrics import SLO, request_record, summarize
from services.bench.runner import Run
from services.bench.search import GoodputSearch

SCHEMA = "ecoserve-bench/1"
RULE = "=" * 64


def run_document(run: Run, slo: SLO) -> dict[str, Any]:
    return {
        "rate": run.rate if math.isfinite(run.rate) else "inf",
        "burstiness": run.burstiness if math.isfinite(run.burstiness) else "inf",
        "seed": run.seed,
        "started_at": run.started_at,
        **summarize(run.results, run.duration, slo),
        "requests": [request_record(r, slo) for r in run.results],
    }


def build_document(
    config: dict[str, Any], runs: Sequence[dict[str, Any]], search: GoodputSearch | None
) -> dict[str, Any]:
    if search is None:
        attainment = runs[-1]["attainment"] if runs else None
    else:
        at_goodput = [r["attainment"] for r in runs if r["rate"] == search.goodput]
        attainment = at_goodput[-1] if at_goodput else None
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "runs": list(runs),
        "attainment": attainment,
        "search": search.describe() if search else None,
        "goodput_rps": search.goodput if search else None,
    }


def write_json(document: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def format_run(run: dict[str, Any], slo: SLO, target: float) -> str:
    """vLLM-style result block for one run."""
    line = "{:<44}{:>20}".format
    rows = [
        f"{' Serving Benchmark Result ':=^64}",
        line("Request rate (req/s):", f"{run['rate']}"),
        line("Burstiness:", f"{run['burstiness']}"),
        line("Successful requests:", run["completed"]),
        line("Failed requests:", run["failed"]),
        line("Benchmark duration (s):", f"{run['duration_s']:.2f}"),
        line("Total input tokens:", run["total_input_tokens"]),
        line("Total generated tokens:", run["total_output_tokens"]),
        line("Request throughput (req/s):", f"{run['request_throughput']:.2f}"),
        line("Output token throughput (tok/s):", f"{run['output_throughput']:.2f}"),
        line("Total token throughput (tok/s):", f"{run['total_token_throughput']:.2f}"),
        line(f"SLO attainment (TTFT≤{slo.ttft:g}s, TPOT≤{slo.tpot * 1000:g}ms):", f"{run['attainment']:.3f}"),
        line("  target met:", f"{'yes' if run['attainment'] >= target else 'no'} (≥{target:g})"),
        line("Good request throughput (req/s):", f"{run['good_request_throughput']:.2f}"),
        f"{' Latency (ms) ':-^64}",
        "{:<16}{:>12}{:>12}{:>12}{:>12}".format("metric", "mean", "median", "p90", "p99"),
    ]
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        d = run[key]
        rows.append(
            f"{label:<16}{_ms(d['mean']):>12}{_ms(d['median']):>12}{_ms(d['p90']):>12}{_ms(d['p99']):>12}"
        )
    for error, count in run["errors"].items():
        rows.append(f"error ×{count}: {error}")
    rows.append(RULE)
    return "\n".join(rows)


def format_search(search: GoodputSearch, runs: Sequence[dict[str, Any]]) -> str:
    """One line per run of the search, then the goodput."""
    rows = [
        f"{' Goodput search ':=^64}",
        "{:>4}{:>10}{:>12}{:>6}{:>12}{:>8}{:>12}".format(
            "run", "rate", "attainment", "met", "req/s done", "failed", "p90 TTFT ms"
        ),
    ]
    for number, run in enumerate(runs, 1):
        rows.append(
            "{:>4}{:>10.3f}{:>12.3f}{:>6}{:>12.2f}{:>8}{:>12}".format(
                number,
                run["rate"],
                run["attainment"],
                "yes" if search.passed(run["attainment"]) else "no",
                run["request_throughput"],
                run["failed"],
                _ms(run["ttft"]["p90"]),
            )
        )
    if search.low is None:
        verdict = f"no rate down to {search.min_rate:g} req/s met the target"
    elif search.high is None:
        verdict = "every rate tried met the target (a lower bound)"
    else:
        verdict = f"between {search.low:.3g} (met) and {search.high:.3g} (missed)"
    rows.append(f"Goodput at attainment ≥ {search.target:g}: {search.goodput:.3f} req/s — {verdict}")
    rows.append(RULE)
    return "\n".join(rows)
