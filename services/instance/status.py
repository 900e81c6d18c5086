"""The instance's status report (InstanceStatus), which is also its heartbeat.

`ProgressBook` follows the requests an instance holds from its engine's step outputs; `StatusReporter`
publishes a report soon after news (coalesced, at most one per `min_gap`), after steps that only moved
requests along at most once per `progress_gap`, and on a timer whenever nothing else went out for
`heartbeat_interval`. News is what the coordinator schedules on: a request admitted, finished or given its
first token, a change of phase or state. A per-token report from a fast engine cost the instance, NATS and
the coordinator more than the coordinator gains from it (~4 % of a tiny model's served throughput). The
timer runs on the event loop, not in the engine thread, so reports keep flowing while a long prefill occupies
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.instance.engine.llm_engine import EngineStats, RequestOutput
from shared.messages import RequestProgress

log = logging.getLogger(__name__)

STEP_REPORT_MIN_GAP = 0.01  # seconds: a fast engine would otherwise publish hundreds of reports a second
PROGRESS_REPORT_GAP = 0.05  # seconds between reports that carry nothing but more tokens


def phase_of(stats: EngineStats) -> str:
    """The phase of the latest step: prefill, decode or mixed; idle when nothing is held."""
    if stats.num_running + stats.num_waiting == 0:
        return "idle"
    prefill, decode = stats.last_step_prefill_tokens, stats.last_step_decode_tokens
    if prefill and decode:
        return "mixed"
    if prefill:
        return "prefill"
    return "decode" if decode else "idle"


@dataclass
class _Progress:
    prompt_tokens: int
    arrival_time: float
    output_tokens: int = 0
    first_token_time: float | None = None


class ProgressBook:
    """Per-request progress of the requests an instance holds, in the order they arrived."""

    def __init__(self, to_unix: Callable[[float], float]):
        self._to_unix = to_unix  # engine clock → unix seconds
        self._requests: dict[str, _Progress] = {}

    def add(self, request_id: str, prompt_tokens: int, arrival_time: float) -> None:
        self._requests[request_id] = _Progress(prompt_tokens, arrival_time)

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def update(self, outputs: list[RequestOutput]) -> bool:
        """Apply one step's outputs (finished requests leave the book); True when that is news: a request
        finished or got its first token."""
        news = False
        for out in outputs:
            progress = self._requests.get(out.request_id)
            if progress is None:
                continue
            if out.finished:
                del self._requests[out.request_id]
                news = True
                continue
            progress.output_tokens = out.num_output_tokens
            if progress.first_token_time is None and out.first_token_time is not None:
                progress.first_token_time = self._to_unix(out.first_token_time)
                news = True
        return news

    def snapshot(self) -> list[RequestProgress]:
        return [
            RequestProgress(
                request_id=request_id,
                prompt_tokens=p.prompt_tokens,
                output_tokens=p.output_tokens,
                arrival_time=p.arrival_time,
                first_token_time=p.first_token_time,
            )
            for request_id, p in self._requests.items()
        ]


class StatusReporter:
    """Runs `publish(seq, unix_time)` after `poke()` (news), after `poke_progress()` (a step that only moved
    requests along) and as a heartbeat when idle."""

    def __init__(
        self,
        publish: Callable[[int, float], Awaitable[None]],
        heartbeat_interval: float,
        min_gap: float = STEP_REPORT_MIN_GAP,
        progress_gap: float = PROGRESS_REPORT_GAP,
    ):
        self._publish = publish
        self._interval = heartbeat_interval
        self._min_gap = min_gap
        self._progress_gap = max(min_gap, progress_gap)
        self._poked = asyncio.Event()  # any poke
        self._news = asyncio.Event()  # a poke that should go out within min_gap
        self._seq = 0
        self._last = float("-inf")  # monotonic time of the latest report
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ecoserve-status")

    def poke(self) -> None:
        """Report soon: several pokes within `min_gap` become one report carrying the latest state."""
        self._news.set()
        self._poked.set()

    def poke_progress(self) -> None:
        """Report within `progress_gap` (sooner if news comes meanwhile)."""
        self._poked.set()

    async def report_now(self) -> None:
        """Publish a report immediately (state changes, the final report before leaving)."""
        await self._report()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            due = self._last + self._interval - time.monotonic()
            if due > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._poked.wait()
            while (
                not self._news.is_set() and (wait := self._last + self._progress_gap - time.monotonic()) > 0
            ):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._news.wait()
            gap = self._last + self._min_gap - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._poked.clear()
            self._news.clear()
            try:
                await self._report()
            except Exception:  # a report that cannot go out (NATS reconnecting) must not end the heartbeat
                log.exception("status report failed")

    async def _report(self) -> None:
        seq = self._seq
        self._seq += 1
        self._last = time.monotonic()
        await self._publish(seq, time.time())
