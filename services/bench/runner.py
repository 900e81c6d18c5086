"""One benchmark run: a workload's first n requests sent on an arrival schedule at one rate.

Prompts are made before the clock starts, so making them costs the run nothing. The dispatcher sleeps until
each request's send time and starts it as its own task, so a slow response never delays later arrivals (an
open-loop load, as in `vllm bench serve`); with --max-concurrency a request that arrives while the limit is
reached waits for a slot, and its `sent` time shows the wait. The run lasts until the last response ends.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from services.bench.arrivals import arrival_times
from services.bench.client import OpenAIClient, RequestResult
from services.bench.prompts import PromptMaker
from services.bench.workloads import Prompt, Workload


@dataclass
class Run:
    rate: float
    burstiness: float
    seed: int
    results: list[RequestResult]
    prompts: list[Prompt]
    duration: float = 0.0  # from the first scheduled send to the end of the last response
    started_at: float = 0.0  # Unix time of the run's start, to line runs up with server-side logs


def plan_run(
    workload: Workload, maker: PromptMaker, *, n: int, rate: float, burstiness: float, seed: int
) -> Run:
    times = arrival_times(n, rate, burstiness, seed)
    results: list[RequestResult] = []
    prompts: list[Prompt] = []
    for index, (spec, at) in enumerate(zip(workload.requests(n), times, strict=True)):
        prompt, input_len = maker.make(index, spec)
        prompts.append(prompt)
        results.append(RequestResult(index, input_len, spec.output_len, scheduled=at))
    return Run(rate, burstiness, seed, results, prompts)


async def execute(
    client: OpenAIClient,
    run: Run,
    *,
    max_concurrency: int | None = None,
    progress: bool = True,
) -> Run:
    """Send every request of `run` at its scheduled time and wait for all responses (fills `run`)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(
        total=len(run.results),
        desc=f"rate {run.rate:g} req/s",
        unit="req",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )

    async def one(result: RequestResult, prompt: Prompt) -> None:
        try:
            if limit is None:
                await client.send(result, prompt, start)
            else:
                async with limit:
                    await client.send(result, prompt, start)
        finally:
            bar.update(1)

    run.started_at = time.time()
    start = time.perf_counter()
    tasks = []
    try:
        for result, prompt in zip(run.results, run.prompts, strict=True):
            delay = start + result.scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(result, prompt)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # only matters when interrupted: finished tasks ignore it
        bar.close()
    run.duration = time.perf_counter() - start
    return run
