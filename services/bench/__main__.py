"""`ecoserve bench`: a goodput benchmark for any OpenAI-compatible server (ecoserve, vLLM, transformers
serve).

    ecoserve bench --url http://127.0.0.1:8000 --workload sharegpt --rate 2 --duration 30 --json out.json
    ecoserve bench --url ... --workload alpaca --search --attainment 0.9 --max-runs 10 --plot-dir plots/

Requests stream from /v1/completions (token-id prompts of exact length; `--api chat` for
/v1/chat/completions) with temperature 0, `ignore_eos` and `max_tokens` = the sampled output length, on a
Poisson or Gamma arrival schedule. One run at `--rate`, or with `--search` the goodput: the highest rate at
which `--attainment` of the requests meet both SLOs (search.py). Prints a table per run, writes the JSON of
report.py and, with --plot-dir, PNGs. Against ecoserve, `--nats URL` also records every instance's phase and
prefill window over each run (phases.py) into the JSON and `phases.png`, and FuDG's KV transfers (count,
bytes, transfer seconds) as each run's `kv_transfers`. Workloads and their scaling:
workloads.py; metrics: metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from services.bench.arrivals import request_count
from services.bench.client import OpenAIClient, RequestResult, base_url, first_model
from services.bench.metrics import SLO
from services.bench.phases import PhaseBook, PhaseRecorder
from services.bench.prompts import DEFAULT_ID_RANGE, PromptMaker, load_tokenizer
from services.bench.report import build_document, format_run, format_search, run_document, write_json
from services.bench.runner import execute, plan_run
from services.bench.search import GoodputSearch
from services.bench.workloads import DATASETS, Workload, WorkloadError, load_workload
from shared.subjects import DEFAULT_PREFIX, check_prefix

# SLOs for a JSONL workload when none are given: the paper's ShareGPT (balanced) defaults.
FILE_SLO = SLO(ttft=5.0, tpot=0.1)
PROBE_TOKENS = 2


def _attainment(text: str) -> float:
    """0.9, or P50 / P90 / P99 (case-insensitive)."""
    value = float(text[1:]) / 100 if text[:1] in "pP" else float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"attainment must be in (0, 1], got {text}")
    return value


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _id_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, got {text!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False, {}) that would only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == {}:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ecoserve bench",
        description="Goodput benchmark against any OpenAI-compatible server.",
        formatter_class=_HelpFormatter,
    )
    server = p.add_argument_group("server")
    server.add_argument(
        "--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)"
    )
    server.add_argument("--model", help="model name to send (default: the first one /v1/models lists)")
    server.add_argument(
        "--api", choices=["completions", "chat"], default="completions", help="/v1/completions or chat"
    )
    server.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (env OPENAI_API_KEY)"
    )
    server.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so outputs have exactly max_tokens (strict servers reject the field)",
    )
    server.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into each body")
    server.add_argument("--request-timeout", type=_positive(float), default=600.0, help="seconds")
    server.add_argument(
        "--nats",
        help="ecoserve only: NATS URL; record the instances' phases and prefill windows (status reports)",
    )
    server.add_argument("--prefix", default=DEFAULT_PREFIX, help="ecoserve's subject prefix (with --nats)")

    load = p.add_argument_group("workload")
    load.add_argument("--workload", default="sharegpt", help=f"{' | '.join(DATASETS)} | FILE.jsonl")
    load.add_argument(
        "--scale", type=_positive(float), help="scale both lengths (default per workload: workloads.py)"
    )
    load.add_argument("--input-scale", type=_positive(float), help="scale prompts (overrides --scale)")
    load.add_argument("--output-scale", type=_positive(float), help="scale outputs (overrides --scale)")
    load.add_argument(
        "--prompt-mode",
        choices=["ids", "text"],
        help="token-id prompts (exact lengths) or text (default: ids, text for --api chat)",
    )
    load.add_argument("--tokenizer", help="tokenizer folder: prompts from its vocabulary, text sized exactly")
    load.add_argument(
        "--token-id-range",
        type=_id_range,
        default="{}:{}".format(*DEFAULT_ID_RANGE),  # argparse applies `type` to a string default
        help="LOW:HIGH ids for token-id prompts without --tokenizer",
    )

    rate = p.add_argument_group("arrivals")
    how = rate.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=_positive(float), help="requests/s for one run (inf: all at once)")
    how.add_argument("--search", action="store_true", help="find the goodput by ramping and bisecting")
    rate.add_argument(
        "--burstiness", type=_positive(float), default=1.0, help="Gamma shape: 1 Poisson, <1 bursty"
    )
    rate.add_argument("--duration", type=_positive(float), default=10.0, help="seconds of arrivals per run")
    rate.add_argument("--num-requests", type=_positive(int), help="requests per run (overrides --duration)")
    rate.add_argument("--min-requests", type=_positive(int), default=1, help="at least this many per run")
    rate.add_argument("--max-concurrency", type=_positive(int), help="cap on requests in flight")
    rate.add_argument("--seed", type=int, default=0, help="seeds lengths, prompts and arrivals")

    slo = p.add_argument_group("SLOs and search")
    slo.add_argument("--slo-ttft", type=_positive(float), help="seconds (default: the workload's)")
    slo.add_argument("--slo-tpot", type=_positive(float), help="seconds (default: the workload's)")
    slo.add_argument(
        "--attainment", type=_attainment, default=0.9, help="target share meeting both SLOs (0.9 or P90)"
    )
    slo.add_argument("--search-start", type=_positive(float), default=1.0, help="first rate of the search")
    slo.add_argument("--search-factor", type=float, default=2.0, help="ramp multiplier")
    slo.add_argument("--search-tolerance", type=_positive(float), default=0.1, help="relative bracket width")
    slo.add_argument("--max-runs", type=_positive(int), default=10, help="runs the search may use")
    slo.add_argument("--search-min-rate", type=_positive(float), default=0.01, help="give up below this rate")
    slo.add_argument("--search-max-rate", type=_positive(float), help="stop ramping up at this rate")

    out = p.add_argument_group("output")
    out.add_argument("--json", dest="json_path", help="write the JSON report here")
    out.add_argument("--plot-dir", help="write PNG plots here")
    out.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr"
    )
    return p


def _slo(args: argparse.Namespace) -> SLO:
    shape = DATASETS.get(args.workload)
    default = SLO(shape.slo_ttft, shape.slo_tpot) if shape else FILE_SLO
    return SLO(args.slo_ttft or default.ttft, args.slo_tpot or default.tpot)


def _config(args: argparse.Namespace, workload: Workload, model: str, slo: SLO, mode: str) -> dict[str, Any]:
    return {
        "url": base_url(args.url),
        "api": args.api,
        "model": model,
        "workload": workload.describe(),
        "prompt_mode": mode,
        "tokenizer": args.tokenizer,
        "token_id_range": None if args.tokenizer else list(args.token_id_range),
        "ignore_eos": args.ignore_eos,
        "extra_body": args.extra_body,
        "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot},
        "attainment_target": args.attainment,
        "mode": "search" if args.search else "fixed",
        "rate": None if args.search else (args.rate if math.isfinite(args.rate) else "inf"),
        "burstiness": args.burstiness if math.isfinite(args.burstiness) else "inf",
        "duration_s": None if args.num_requests else args.duration,
        "num_requests": args.num_requests,
        "min_requests": args.min_requests,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "request_timeout_s": args.request_timeout,
        "nats": {"url": args.nats, "prefix": args.prefix} if args.nats else None,
    }


def _plots(args: argparse.Namespace, runs: list[dict[str, Any]], slo: SLO, goodput: float | None) -> None:
    from services.bench.plots import plot_attainment, plot_latencies, plot_phases  # matplotlib when asked

    directory = Path(args.plot_dir)
    finite = [(r["rate"], r["attainment"]) for r in runs if isinstance(r["rate"], float | int)]
    if finite:
        plot_attainment(finite, args.attainment, directory / "attainment.png", goodput=goodput)
    shown = [r for r in runs if goodput is None or r["rate"] == goodput] or runs[-1:]
    if shown:
        run = shown[-1]
        title = f"rate {run['rate']} req/s: attainment {run['attainment']:.3f}"
        plot_latencies(run["requests"], slo, directory / "latency.png", title=title)
        if run.get("phases"):
            timeline = [(r["t"], r["instance"], r["phase"], r["prefill_window"]) for r in run["phases"]]
            plot_phases(timeline, directory / "phases.png", end=run["duration_s"], title=title)
    print(f"plots in {directory}/", file=sys.stderr)


async def bench(args: argparse.Namespace, workload: Workload, maker: PromptMaker, slo: SLO) -> int:
    if not args.nats:
        return await _bench(args, workload, maker, slo, None)
    from nats.errors import Error as NatsError

    recorder = PhaseRecorder(args.nats, args.prefix)
    try:
        await recorder.start()
    except (OSError, TimeoutError, NatsError) as exc:
        print(f"ecoserve bench: cannot subscribe to status reports at {args.nats}: {exc}", file=sys.stderr)
        return 1
    try:
        return await _bench(args, workload, maker, slo, recorder.book)
    finally:
        await recorder.stop()


async def _bench(
    args: argparse.Namespace, workload: Workload, maker: PromptMaker, slo: SLO, phases: PhaseBook | None
) -> int:
    connector = aiohttp.TCPConnector(limit=0)  # aiohttp's default of 100 connections would cap concurrency
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            model = args.model or await first_model(session, args.url, args.api_key)
        except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as exc:
            print(f"ecoserve bench: cannot list models at {args.url}: {exc}", file=sys.stderr)
            return 1
        client = OpenAIClient(
            session,
            args.url,
            model,
            api=args.api,
            api_key=args.api_key,
            ignore_eos=args.ignore_eos,
            extra_body=args.extra_body,
            timeout=args.request_timeout,
        )
        # One short request first: fails fast on a wrong URL, model or API, and warms the server up.
        spec = workload.requests(1)[0]
        prompt, input_len = maker.make(0, spec)
        probe = await client.send(RequestResult(-1, input_len, PROBE_TOKENS, 0.0), prompt, 0.0)
        if not probe.success:
            print(f"ecoserve bench: the probe request failed: {probe.error}", file=sys.stderr)
            return 1

        search = None
        if args.search:
            search = GoodputSearch(
                target=args.attainment,
                start_rate=args.search_start,
                factor=args.search_factor,
                tolerance=args.search_tolerance,
                max_runs=args.max_runs,
                min_rate=args.search_min_rate,
                max_rate=args.search_max_rate,
            )
        runs: list[dict[str, Any]] = []
        rate = search.next_rate() if search else args.rate
        while rate is not None:
            n = request_count(rate, args.duration, args.num_requests, args.min_requests)
            run = plan_run(workload, maker, n=n, rate=rate, burstiness=args.burstiness, seed=args.seed)
            await execute(client, run, max_concurrency=args.max_concurrency, progress=args.progress)
            document = run_document(run, slo)
            if phases is not None:
                document["phases"] = phases.between(run.started_at, run.started_at + run.duration)
                # FuDG: the run's KV hand-offs (a report is stamped when the ack arrived; allow a late one).
                transfers = phases.transfers_between(run.started_at, run.started_at + run.duration + 0.5)
                if transfers is not None:
                    document["kv_transfers"] = transfers
            runs.append(document)
            if search is None:
                print(format_run(document, slo, args.attainment))
                break
            search.record(rate, document["attainment"])
            verdict = "met" if search.passed(document["attainment"]) else "missed"
            print(
                f"run {len(runs)}: rate {rate:.3f} req/s, {n} requests -> "
                f"attainment {document['attainment']:.3f} ({verdict})",
                file=sys.stderr,
            )
            rate = search.next_rate()

    if search is not None:
        at_goodput = [r for r in runs if r["rate"] == search.goodput]
        if at_goodput:
            print(format_run(at_goodput[-1], slo, args.attainment))
        print(format_search(search, runs))
    document = build_document(_config(args, workload, model, slo, maker.mode), runs, search)
    if args.json_path:
        print(f"JSON report: {write_json(document, args.json_path)}", file=sys.stderr)
    if args.plot_dir and runs:
        _plots(args, runs, slo, search.goodput if search else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_requests is None and args.rate is not None and math.isinf(args.rate):
        parser.error("--rate inf needs --num-requests")
    if not isinstance(args.extra_body, dict):
        parser.error("--extra-body must be a JSON object")
    if args.search_factor <= 1:
        parser.error("--search-factor must be greater than 1")
    try:
        check_prefix(args.prefix)
    except ValueError as exc:
        parser.error(str(exc))
    mode = args.prompt_mode or ("text" if args.api == "chat" else "ids")
    if args.api == "chat" and mode == "ids":
        parser.error("--api chat sends text: use --prompt-mode text")
    scale = {"input_scale": args.input_scale or args.scale, "output_scale": args.output_scale or args.scale}
    try:
        workload = load_workload(args.workload, seed=args.seed, **scale)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        maker = PromptMaker(mode, seed=args.seed, tokenizer=tokenizer, id_range=args.token_id_range)
    except (WorkloadError, OSError, ValueError) as exc:
        print(f"ecoserve bench: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(bench(args, workload, maker, _slo(args)))
    except KeyboardInterrupt:
        print("ecoserve bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
