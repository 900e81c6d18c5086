"""Every held request's token stream, fed one engine step at a time.

The engine's step listener hands `on_step` a whole step's outputs; their TokenChunks are built right there
on the event loop and queued, and one sender task publishes the queue (nats-py's `publish` only buffers;
the client flushes on its own). What is queued for one router goes out as one message (a TokenBatch, or a
plain TokenChunk when it is alone), so a step costs one task wake-up and one publish per router, not one per
request: with a fast engine the per-request work was most of the serving overhead.

Guarantees, per request: chunks numbered 0, 1, 2, … in order, and exactly one terminal chunk whatever ends
the request: the engine finished it, the router aborted it (`abort`), the instance failed it (`fail`, at
shutdown or when the engine died). A request leaves the table the moment its terminal chunk is queued;
later outputs for it (a step already under way when it was aborted) are dropped. A request whose chunk
cannot be sent leaves without one (`on_lost`: the caller stops it in the engine).

PaDG's output hold (engine/output_hold.py) sits between the step and the chunks: while a hold is on,
outputs are buffered and released merged, in order, by a later step, by a timer at the hold's deadline, or
when the hold ends. An aborted or failed request's held outputs are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from services.instance.engine.llm_engine import RequestOutput
from services.instance.engine.output_hold import OutputHold
from services.instance.token_stream import ChunkBuilder
from shared.messages import TokenBatch, TokenChunk
from shared.wire import encode

log = logging.getLogger(__name__)

Send = Callable[[str, bytes], Awaitable[None]]  # publish one payload on a subject
DEADLINE_SLACK = 0.001  # seconds past a hold's deadline before the timer releases (the deadline itself holds)


@dataclass
class _Open:
    subject: str
    builder: ChunkBuilder


class StepPublisher:
    """Run `start()` on the event loop; feed it with `on_step`; `close()` flushes and stops the sender."""

    def __init__(
        self,
        send: Send,
        clock: Callable[[], float],
        on_end: Callable[[str], None] = lambda request_id: None,
        on_lost: Callable[[str], None] = lambda request_id: None,
    ):
        self._send = send
        self._clock = clock  # the engine's clock: hold windows and deadlines are on it
        self._on_end = on_end  # a request got its terminal chunk
        self._on_lost = on_lost  # a request's chunk could not be sent: it is closed without a terminal chunk
        self._open: dict[str, _Open] = {}
        self._queue: deque[tuple[str, TokenChunk]] = deque()  # subject, chunk
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()  # the queue is empty and every payload handed to `send`
        self._sent.set()
        self._empty = asyncio.Event()  # no open request
        self._empty.set()
        self._hold: OutputHold | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None
        self._pending = False  # the engine held unfinished requests after its latest step
        self._task: asyncio.Task[None] | None = None

    # -- requests -------------------------------------------------------------------------------------------

    def open(self, request_id: str, subject: str, builder: ChunkBuilder) -> None:
        if request_id in self._open:
            raise ValueError(f"request {request_id!r} is already open")
        self._open[request_id] = _Open(subject, builder)
        self._empty.clear()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._open

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._open))

    def on_step(self, outputs: list[RequestOutput], *, pending: bool) -> None:
        """One step's outputs (any request's; those no longer open are dropped). `pending`: the engine
        still holds unfinished requests after the step."""
        self._pending = pending
        mine = [out for out in outputs if out.request_id in self._open]
        if self._hold is not None:
            mine = self._hold.push(mine, self._clock(), pending=pending)
            self._arm_timer()
        for out in mine:
            self._emit(out)

    def abort(self, request_id: str) -> bool:
        """The router aborted the request: its terminal chunk (finish reason "abort") now. False when it is
        not open here (finished already, or never here)."""
        return self._end(request_id, lambda builder: builder.aborted())

    def fail(self, request_id: str, message: str) -> bool:
        """The instance cannot serve the request: its terminal chunk carries `message` as the error."""
        return self._end(request_id, lambda builder: builder.error(message))

    def release(self, request_id: str) -> bool:
        """The request left this instance without a terminal chunk (FuDG: it continues on a decode instance,
        which numbers its chunks on). False when it is not open here."""
        if request_id not in self._open:
            return False
        if self._hold is not None:
            self._hold.discard(request_id)
        self._close(request_id)
        return True

    def fail_all(self, message: str) -> None:
        for request_id in self:
            self.fail(request_id, message)

    async def wait_empty(self) -> None:
        """Until no request is open."""
        await self._empty.wait()

    # -- output hold ----------------------------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        return self._hold is not None and self._hold.holding

    @property
    def num_held_requests(self) -> int:
        return 0 if self._hold is None else self._hold.num_held_requests

    def begin_hold(self, ttft_slo: float, now: float) -> None:
        """Hold outputs from `now` (engine clock) for at most `ttft_slo` seconds. While a hold is on, a
        repeated begin keeps its start and its SLO, so a retried message does not extend it."""
        if self._hold is None or not self._hold.holding:
            self._hold = OutputHold(ttft_slo)
            self._hold.begin(now)

    def end_hold(self) -> None:
        """Release everything held and stop holding."""
        hold, self._hold = self._hold, None
        self._cancel_timer()
        if hold is not None:
            for out in hold.end():
                if out.request_id in self._open:
                    self._emit(out)

    def _arm_timer(self) -> None:
        due = None if self._hold is None else self._hold.deadline
        if due is not None and not math.isfinite(due):
            due = None  # an infinite SLO: only the window's close releases
        if due == self._timer_due:
            return
        self._cancel_timer()
        if due is not None:
            delay = max(0.0, due - self._clock()) + DEADLINE_SLACK
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_deadline)
            self._timer_due = due

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_due = None

    def _on_deadline(self) -> None:
        """No step came before the hold's deadline: release what is due."""
        self._timer = None
        self._timer_due = None
        self.on_step([], pending=self._pending)

    # -- chunks ---------------------------------------------------------------------------------------------

    def _emit(self, out: RequestOutput) -> None:
        entry = self._open[out.request_id]
        chunk = entry.builder.from_output(out)
        self._queue_chunk(entry.subject, chunk)
        if chunk.finished:
            self._close(out.request_id)

    def _end(self, request_id: str, terminal: Callable[[ChunkBuilder], TokenChunk]) -> bool:
        entry = self._open.get(request_id)
        if entry is None:
            return False
        if self._hold is not None:
            self._hold.discard(request_id)
        self._queue_chunk(entry.subject, terminal(entry.builder))
        self._close(request_id)
        return True

    def _lose(self, request_id: str) -> None:
        """A chunk of the request was lost: the router cannot follow its stream, so stop serving it."""
        if self._open.pop(request_id, None) is None:
            return  # its terminal chunk was queued already
        if self._hold is not None:
            self._hold.discard(request_id)
        if not self._open:
            self._empty.set()
        try:
            self._on_lost(request_id)
        except Exception:
            log.exception("request %s: lost callback failed", request_id)

    def _close(self, request_id: str) -> None:
        del self._open[request_id]
        if not self._open:
            self._empty.set()
        try:
            self._on_end(request_id)
        except Exception:
            log.exception("request %s: end callback failed", request_id)

    def _queue_chunk(self, subject: str, chunk: TokenChunk) -> None:
        self._queue.append((subject, chunk))
        self._sent.clear()
        self._wake.set()

    # -- sender ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ecoserve-step-publisher")

    async def flushed(self) -> None:
        """Until every chunk queued so far was handed to `send`."""
        await self._sent.wait()

    async def close(self) -> None:
        """Hand every queued chunk to `send`, then stop the sender."""
        if self._task is None:
            return
        await self._sent.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._cancel_timer()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            failures = 0
            while self._queue:
                for subject, chunks in self._take_batches():
                    try:
                        await self._send(subject, _payload(chunks))
                    except Exception as exc:  # NATS closed under us, or a bug: the streams have a hole now
                        if failures == 0:
                            log.warning("publishing tokens on %s failed: %r", subject, exc)
                        failures += 1
                        for chunk in chunks:
                            self._lose(chunk.request_id)
            if failures > 1:
                log.warning("%d more token messages could not be published", failures - 1)
            self._sent.set()

    def _take_batches(self) -> list[tuple[str, list[TokenChunk]]]:
        """Everything queued, grouped by subject; each request's chunks stay in order."""
        batches: dict[str, list[TokenChunk]] = {}
        while self._queue:
            subject, chunk = self._queue.popleft()
            batches.setdefault(subject, []).append(chunk)
        return list(batches.items())


def _payload(chunks: list[TokenChunk]) -> bytes:
    return encode(chunks[0]) if len(chunks) == 1 else encode(TokenBatch(chunks=chunks))
