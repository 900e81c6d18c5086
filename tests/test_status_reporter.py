"""StatusReporter's pacing (news soon, progress at most every progress_gap, heartbeats when idle) and
ProgressBook's notion of news. Real event loop and clock; the gaps are wide enough for a loaded machine."""

from __future__ import annotations

import asyncio
import time

from services.instance.engine.llm_engine import RequestOutput
from services.instance.status import ProgressBook, StatusReporter


class Reports:
    def __init__(self) -> None:
        self.times: list[float] = []

    async def publish(self, seq: int, now: float) -> None:
        assert seq == len(self.times)
        self.times.append(time.monotonic())


async def test_progress_pokes_coalesce_and_news_cuts_the_wait_short():
    reports = Reports()
    reporter = StatusReporter(reports.publish, heartbeat_interval=10.0, min_gap=0.01, progress_gap=0.4)
    reporter.start()
    try:
        await asyncio.sleep(0.05)  # the first report goes out at once
        assert len(reports.times) == 1
        started = time.monotonic()
        for _ in range(20):  # a fast engine's steps, each only moving requests along
            reporter.poke_progress()
            await asyncio.sleep(0.01)
        assert len(reports.times) == 1, "progress waits for progress_gap"
        reporter.poke()  # news: a request finished
        await asyncio.sleep(0.1)
        assert len(reports.times) == 2 and reports.times[1] - started < 0.35
        reporter.poke_progress()
        await asyncio.sleep(0.6)
        assert len(reports.times) == 3
        assert reports.times[2] - reports.times[1] >= 0.39, "progress_gap is counted from the latest report"
    finally:
        await reporter.stop()


async def test_an_idle_instance_still_heartbeats():
    reports = Reports()
    reporter = StatusReporter(reports.publish, heartbeat_interval=0.1, min_gap=0.01, progress_gap=0.05)
    reporter.start()
    try:
        await asyncio.sleep(0.55)
        assert 4 <= len(reports.times) <= 7
    finally:
        await reporter.stop()


def output(request_id: str, tokens: int, *, first_token_time: float | None, finished: bool = False):
    reason = "length" if finished else None
    return RequestOutput(
        request_id, [1], None, finished, reason, None, 4, tokens, first_token_time=first_token_time
    )


def test_news_is_a_first_token_or_a_finish():
    book = ProgressBook(to_unix=lambda t: t)
    book.add("a", prompt_tokens=4, arrival_time=0.0)
    book.add("b", prompt_tokens=4, arrival_time=0.0)
    assert book.update([output("a", 1, first_token_time=1.0)]), "a first token"
    assert not book.update([output("a", 2, first_token_time=1.0)]), "one more token"
    assert book.update([output("a", 3, first_token_time=1.0, finished=True)]), "a finish"
    assert not book.update([output("z", 1, first_token_time=1.0)]), "not ours"
    assert [p.request_id for p in book.snapshot()] == ["b"]
