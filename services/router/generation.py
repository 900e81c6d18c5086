"""One HTTP request's generation: its sub-requests (prompts × n) submitted, followed and, when left, aborted.

Life: `start()` registers every sub-request's queue entry, then submits them all at once; `next_update()`
returns the next ChoiceUpdate until every choice has finished (None), raising GenerationFailed (an instance
was lost, chunks went missing, the engine failed) or ClientGone; `close(reason)` must always run: it aborts
whatever is still generating on its instance, including sub-requests whose submit is still in flight (they
are aborted when their ack arrives, so a client that leaves during submission leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.router import coordinator_client
from services.router.choice import ChoiceState, ChoiceUpdate
from services.router.errors import APIError
from services.router.parsing import ParsedRequest
from services.router.runtime import RouterRuntime
from services.router.token_streams import ChunkEvent, DisconnectEvent, Event, FailureEvent, Tracked
from shared.messages import SubmitAck, SubmitRequest

log = logging.getLogger(__name__)

DISCONNECT_POLL = 0.25  # seconds between checks that the client is still connected
_background: set[asyncio.Task[Any]] = set()  # late aborts, referenced until done


class GenerationFailed(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


class ClientGone(Exception):
    pass


@dataclass
class _SubRequest:
    request_id: str
    index: int  # its choice's index
    prompt_index: int
    state: ChoiceState
    sampling: dict[str, Any]
    tracked: Tracked | None = None  # set by start()
    submit_task: asyncio.Task[SubmitAck] | None = None
    done: bool = False  # finished or failed on its instance: nothing left to abort
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_time_seen: bool = False


class Generation:
    def __init__(
        self,
        runtime: RouterRuntime,
        parsed: ParsedRequest,
        *,
        response_id: str,
        prompt_ids: Sequence[list[int]],
        sampling: Sequence[dict[str, Any]],  # one per prompt (max_tokens may differ)
        arrival_time: float,  # unix seconds, for the SubmitRequest
        arrival_perf: float,  # perf_counter(), for latency metrics
        is_disconnected: Callable[[], bool],
    ):
        self._rt = runtime
        self._parsed = parsed
        self._prompt_ids = prompt_ids
        self._arrival_time = arrival_time
        self._arrival_perf = arrival_perf
        self._is_disconnected = is_disconnected
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._labels = {"model_name": runtime.model.name}
        self._subs: list[_SubRequest] = []
        self._by_index: dict[int, _SubRequest] = {}
        for prompt_index, ids in enumerate(prompt_ids):
            for i in range(parsed.n):
                index = prompt_index * parsed.n + i
                params = dict(sampling[prompt_index])
                if params.get("seed") is not None:
                    # n samples from one seed must still differ; wrapped to stay a signed 64-bit seed
                    params["seed"] = (params["seed"] + i + 2**63) % 2**64 - 2**63
                sub = _SubRequest(
                    request_id=f"{response_id}-{index}",
                    index=index,
                    prompt_index=prompt_index,
                    state=ChoiceState(
                        index,
                        runtime.model.tokenizer,
                        ids,
                        stop=parsed.stop,
                        include_stop_str_in_output=parsed.include_stop_str_in_output,
                        skip_special_tokens=parsed.skip_special_tokens,
                    ),
                    sampling=params,
                )
                self._subs.append(sub)
                self._by_index[index] = sub
        self._open = len(self._subs)
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices it has (as OpenAI and vLLM do)."""
        return sum(len(ids) for ids in self._prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(sub.state.completion_tokens for sub in self._subs)

    async def start(self) -> None:
        """Submit every sub-request; on any failure abort the accepted ones and raise the first APIError."""
        streams = self._rt.streams
        for sub in self._subs:
            # Registered before submitting: tokens can arrive before the SubmitAck.
            sub.tracked = streams.track(sub.request_id, sub.index, self._queue, sub.state.prompt_tokens)
        for sub in self._subs:
            sub.submit_task = asyncio.create_task(self._submit(sub))
        tasks = [sub.submit_task for sub in self._subs if sub.submit_task is not None]
        # Shielded: if the handler is cancelled (client gone), the submits still complete so that close() can
        # abort what they started.
        results = await asyncio.gather(*(asyncio.shield(task) for task in tasks), return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            await self.close("submit failed")
            raise next((e for e in errors if isinstance(e, APIError)), errors[0])
        self._watcher = asyncio.create_task(self._watch_client())

    async def _submit(self, sub: _SubRequest) -> SubmitAck:
        parsed, rt = self._parsed, self._rt
        request = SubmitRequest(
            request_id=sub.request_id,
            model=rt.model.name,
            prompt_token_ids=self._prompt_ids[sub.prompt_index],
            sampling=sub.sampling,
            reply_subject=rt.streams.subject,
            router_id=rt.config.router_id,
            arrival_time=self._arrival_time,
            stream=parsed.stream,
        )
        started = time.perf_counter()
        ack = await coordinator_client.submit(rt.nc, rt.prefix, request)
        rt.metrics.submit_latency.observe(time.perf_counter() - started)
        assert sub.tracked is not None
        sub.tracked.instance_id = (
            ack.instance_id
        )  # kept even when the request already finished and left streams
        rt.streams.assign(sub.request_id, ack.instance_id)
        return ack

    async def _watch_client(self) -> None:
        # aiohttp only cancels handlers on disconnect when the server was started with handler_cancellation;
        # polling the transport notices it either way, even while no token is being written.
        while not self._is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        self._queue.put_nowait(DisconnectEvent())

    async def next_update(self) -> ChoiceUpdate | None:
        """The next choice update, or None once every choice has finished."""
        while self._open > 0:
            event = await self._queue.get()
            if isinstance(event, DisconnectEvent):
                raise ClientGone()
            sub = self._by_index[event.index]
            if isinstance(event, FailureEvent):
                # A lost instance or an engine error has nothing left to abort; after lost chunks the instance
                # may still be generating, so close() aborts it.
                sub.done = event.kind != "seq_gap"
                self._rt.metrics.stream_failures.labels(kind=event.kind).inc()
                log.warning("request %s failed: %s", sub.request_id, event.message)
                raise GenerationFailed(event.message, event.status)
            update = sub.state.apply(event.chunk)
            if update is None:
                continue  # chunks in flight after a stop string
            self._observe(sub, event, update)
            if update.finish_reason is not None:
                self._open -= 1
                sub.done = True
                self._rt.streams.untrack(sub.request_id)
                instance_id = sub.tracked.instance_id if sub.tracked is not None else None
                if update.stopped_by_router and instance_id is not None:
                    await self._abort(instance_id, [sub.request_id], "stop string")
            return update
        return None

    def _observe(self, sub: _SubRequest, event: ChunkEvent, update: ChoiceUpdate) -> None:
        metrics, labels = self._rt.metrics, self._labels
        if update.token_ids:
            if sub.first_token_at is None:
                sub.first_token_at = event.received
                metrics.ttft.labels(**labels).observe(event.received - self._arrival_perf)
            else:
                assert sub.last_token_at is not None
                metrics.itl.labels(**labels).observe(event.received - sub.last_token_at)
            sub.last_token_at = event.received
            metrics.generation_tokens.labels(**labels).inc(len(update.token_ids))
        if event.chunk.queue_time is not None and not sub.queue_time_seen:
            sub.queue_time_seen = True
            metrics.queue_time.labels(**labels).observe(max(0.0, event.chunk.queue_time))
        if update.finish_reason is None:
            return
        end = sub.last_token_at if sub.last_token_at is not None else event.received
        metrics.e2e.labels(**labels).observe(end - self._arrival_perf)
        tokens = sub.state.completion_tokens
        if tokens > 1 and sub.first_token_at is not None:
            metrics.tpot.labels(**labels).observe((end - sub.first_token_at) / (tokens - 1))
        metrics.prompt_tokens.labels(**labels).inc(sub.state.prompt_tokens)
        metrics.request_success.labels(**labels, finished_reason=update.finish_reason).inc()

    async def close(self, reason: str) -> None:
        """Abort every sub-request still generating (now, or once its submit is acknowledged)."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        by_instance: defaultdict[str, list[str]] = defaultdict(list)
        for sub in self._subs:
            self._rt.streams.untrack(sub.request_id)
            task = sub.submit_task
            if task is not None and task.done() and not task.cancelled():
                task.exception()  # retrieved here (start() may not have): no "never retrieved" warning
            if sub.done:
                continue
            instance_id = sub.tracked.instance_id if sub.tracked is not None else None
            if instance_id is not None:
                by_instance[instance_id].append(sub.request_id)
            elif task is not None and not task.done():
                task.add_done_callback(lambda done, sub=sub: self._abort_when_acked(done, sub, reason))
        for instance_id, request_ids in by_instance.items():
            await self._abort(instance_id, request_ids, reason)

    def _abort_when_acked(self, task: asyncio.Task[SubmitAck], sub: _SubRequest, reason: str) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        late = asyncio.get_running_loop().create_task(
            self._abort(task.result().instance_id, [sub.request_id], reason)
        )
        _background.add(late)
        late.add_done_callback(_background.discard)

    async def _abort(self, instance_id: str, request_ids: list[str], reason: str) -> None:
        self._rt.metrics.aborts.labels(reason=reason).inc(len(request_ids))
        await coordinator_client.abort(self._rt.nc, self._rt.prefix, instance_id, request_ids, reason)
