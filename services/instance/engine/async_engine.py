"""Drives an `LLMEngine` from a dedicated thread so an asyncio service stays responsive.

The engine is touched only by its thread: asyncio code submits commands (add, abort, any function of the
engine) that the thread applies between steps, and receives each step's outputs through per-request async
streams (`add_request`) or, without a stream per request, through step listeners (`submit`): a frontend
that handles a whole step in one callback avoids one task wake-up per request and token. torch releases the
GIL inside its kernels, so the event loop keeps serving NATS and heartbeats during a long prefill.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.instance.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from services.instance.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_RECHECK_SECONDS = 0.05


class EngineDeadError(RuntimeError):
    """The engine thread stopped (crashed or shut down); its requests cannot complete."""


class RequestStream:
    """Async iterator over one request's per-step outputs; ends after the output marked finished."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


StepListener = Callable[[list[RequestOutput], EngineStats], None]
DeathListener = Callable[[EngineDeadError], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self._clock = clock
        self._commands: queue.SimpleQueue[Callable[[LLMEngine], Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._listeners: list[StepListener] = []
        self._death_listeners: list[DeathListener] = []
        self._death_told = False
        self._calls: set[asyncio.Future] = set()  # `call`s not answered yet: failed if the engine stops
        self._stats = engine.stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ecoserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread; unfinished streams end with EngineDeadError."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_all(EngineDeadError("engine shut down"))

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the engine's timestamps (arrival, first token, …) are read from."""
        return self._clock

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._dead is None and not self._stopping

    @property
    def crashed(self) -> bool:
        """The engine thread died of an exception (not a requested shutdown)."""
        return self._dead is not None

    # -- requests -------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Validate (raising ParameterError/ValueError here, in the caller) and queue a request whose outputs
        also go to the returned stream."""
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.submit(request_id, prompt_token_ids, params, arrival_time)
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        return stream

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Validate (raising ParameterError/ValueError here, in the caller) and queue a request whose outputs
        reach only the step listeners. The caller keeps its ids unique among unfinished requests, and learns
        of a dead engine from the death listeners."""
        self._check_alive()
        self.engine.validate_request(request_id, prompt_token_ids, params)
        arrival = self._clock() if arrival_time is None else arrival_time
        self._submit(lambda e: e.add_request(request_id, prompt_token_ids, params, arrival))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (applied before the next step); its stream ends now."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream._put(_aborted(request_id))
        self._submit(lambda e: e.abort_request(request_id, self._clock()))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` in the engine thread between steps and return its result."""
        self._check_alive()
        assert self._loop is not None
        future: asyncio.Future = self._loop.create_future()
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)

        def apply(engine: LLMEngine) -> None:
            try:
                result = fn(engine)
            except Exception as exc:  # handed back to the awaiting caller
                self._loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)

        self._submit(apply)
        return await future

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (or command batch)."""
        return self._stats

    def add_step_listener(self, listener: StepListener) -> None:
        """`listener(outputs, stats)` runs on the event loop after every step."""
        self._listeners.append(listener)

    def add_death_listener(self, listener: DeathListener) -> None:
        """`listener(error)` runs once on the event loop when the engine thread stops (crash or shutdown),
        after the listeners saw every step it completed."""
        self._death_listeners.append(listener)

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    # -- engine thread --------------------------------------------------------------------------------------

    def _submit(self, command: Callable[[LLMEngine], Any]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead!r}")
        if self._thread is None or self._stopping:
            raise EngineDeadError("engine is not running")

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._drain_commands()
                if not engine.has_unfinished_requests():
                    self._publish([], engine.stats())
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = engine.step(self._clock())
                stats = engine.stats()
                self._publish(outputs, stats)
                if stats.last_step_prefill_tokens + stats.last_step_decode_tokens == 0:
                    # The policy holds every request back (a closed PaDG window): sleep until a command
                    # can change that, with a short timeout in case the policy's decision depends on time.
                    self._wake.wait(timeout=IDLE_RECHECK_SECONDS)
                    self._wake.clear()
        except BaseException as exc:  # the loop must learn that nothing will complete
            log.exception("engine thread crashed")
            self._dead = exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine crashed: {exc!r}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command(self.engine)

    def _publish(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self._stats = stats
        if outputs or self._listeners:
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._dispatch, outputs, stats)
            except RuntimeError:  # the event loop closed under us during shutdown
                self._stopping = True

    # -- event loop side ------------------------------------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by the frontend; its stream already ended
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]
        for listener in self._listeners:
            try:
                listener(outputs, stats)
            except Exception:
                log.exception("step listener failed")

    def _fail_all(self, exc: EngineDeadError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._put(exc)
        for future in list(self._calls):  # the thread stopped before running them
            _set_exception(future, exc)
        if self._death_told:
            return
        self._death_told = True
        for listener in self._death_listeners:
            try:
                listener(exc)
            except Exception:
                log.exception("death listener failed")


def _aborted(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, [], None, True, "abort", None, 0, 0)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
