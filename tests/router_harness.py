"""Test doubles for the router's peers, speaking the real wire over real NATS: a coordinator that answers
SubmitRequests and an instance that publishes TokenChunks and records AbortRequests. Plus a router served
by aiohttp on a free port, and an SSE reader."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.router.app import create_app
from shared import subjects
from shared.config import RouterConfig
from shared.messages import AbortRequest, ErrorReply, SubmitAck, SubmitRequest, TokenChunk, TokenLogprob
from shared.wire import decode, encode


async def sync(nc: NATS) -> None:
    """Return once the server has processed everything sent on `nc` so far (its SUBs above all).

    nats-py 2.16's `flush()` writes its PING straight to the socket, ahead of SUBs still waiting in the
    client's pending buffer, so its PONG does not prove a subscription is active. A message to ourselves
    goes through that buffer after them.
    """
    inbox = nc.new_inbox()
    probe = await nc.subscribe(inbox, max_msgs=1)
    await nc.publish(inbox, b"")
    await probe.next_msg(timeout=5)


async def eventually(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float = 5.0
) -> Any:
    """Call `probe` until `done(result)` holds or `timeout` passes; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if done(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


@dataclass
class Plan:
    """How the fake cluster answers one SubmitRequest."""

    token_ids: Sequence[int] = ()
    per_chunk: int = 1  # tokens per TokenChunk
    delay: float = 0.0  # seconds between chunks
    first_delay: float = 0.0  # seconds before the first chunk (a prefill)
    finish_reason: str = "length"
    error: ErrorReply | None = None  # answer the submit with this instead of an ack
    instance_id: str = "inst-a"
    tokens_before_ack: bool = False  # publish every chunk, then ack
    finish: bool = True  # False: stop after the chunks without a finished one (an endless generation)
    seqs: Sequence[int] | None = None  # override the chunks' seq numbers (gaps)
    logprobs: bool = False  # attach a TokenLogprob per token
    queue_time: float | None = 0.004


Planner = Callable[[SubmitRequest], Plan | Awaitable[Plan]]


@dataclass
class FakeCluster:
    """Coordinator + instances over the real wire; `planner` decides each request's fate."""

    nc: NATS
    prefix: str
    planner: Planner = field(default=lambda request: Plan())
    submits: list[SubmitRequest] = field(default_factory=list)
    aborts: asyncio.Queue[AbortRequest] = field(default_factory=asyncio.Queue)
    abort_subjects: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _subs: list[Any] = field(default_factory=list)

    async def start(self, instance_ids: Sequence[str] = ("inst-a",)) -> FakeCluster:
        self._subs.append(
            await self.nc.subscribe(
                subjects.submit(self.prefix), queue=subjects.COORDINATOR_QUEUE, cb=self._on_submit
            )
        )
        for instance_id in instance_ids:
            self._subs.append(
                await self.nc.subscribe(subjects.instance_abort(self.prefix, instance_id), cb=self._on_abort)
            )
        await sync(self.nc)
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_abort(self, msg: Msg) -> None:
        self.abort_subjects.append(msg.subject)
        await self.aborts.put(decode(msg.data, AbortRequest))

    async def _on_submit(self, msg: Msg) -> None:
        request = decode(msg.data, SubmitRequest)
        self.submits.append(request)
        plan = self.planner(request)
        if isinstance(plan, Awaitable):
            plan = await plan
        if plan.error is not None:
            await msg.respond(encode(plan.error))
            return
        ack = encode(SubmitAck(request_id=request.request_id, instance_id=plan.instance_id))
        if plan.tokens_before_ack:
            await self._publish(request, plan)
            await msg.respond(ack)
            return
        await msg.respond(ack)
        task = asyncio.create_task(self._publish(request, plan))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, request: SubmitRequest, plan: Plan) -> None:
        ids = list(plan.token_ids)
        groups = [ids[i : i + plan.per_chunk] for i in range(0, len(ids), plan.per_chunk)] or [[]]
        if plan.first_delay:
            await asyncio.sleep(plan.first_delay)
        done = 0
        for seq, group in enumerate(groups):
            done += len(group)
            last = seq == len(groups) - 1 and plan.finish
            chunk = TokenChunk(
                request_id=request.request_id,
                seq=plan.seqs[seq] if plan.seqs is not None else seq,
                token_ids=group,
                finished=last,
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=done,
                logprobs=[fake_logprob(t) for t in group] if plan.logprobs else None,
                finish_reason=plan.finish_reason if last else None,
                queue_time=plan.queue_time if seq == 0 else None,
                first_token_time=time.time() if seq == 0 else None,
            )
            await self.nc.publish(request.reply_subject, encode(chunk))
            if plan.delay and not last:
                await asyncio.sleep(plan.delay)


def fake_logprob(token_id: int) -> TokenLogprob:
    """A deterministic logprob entry: the token itself ranked first, then two neighbours."""
    return TokenLogprob(
        token_id=token_id,
        logprob=-0.25,
        rank=1,
        top_ids=[token_id, token_id + 1, token_id + 2],
        top_logprobs=[-0.25, -1.5, -3.0],
    )


@asynccontextmanager
async def serve_router(
    config: RouterConfig,
    *,
    tokenizer: Any = None,
    served_model_name: str | None = None,
    handler_cancellation: bool = False,
) -> AsyncIterator[str]:
    """The router app on a free loopback port; yields its base URL."""
    if served_model_name is not None:
        config = dataclasses.replace(config, served_model_name=served_model_name)
    app = create_app(config, tokenizer=tokenizer)
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@dataclass
class SSEEvent:
    data: Any  # the decoded JSON, or the string "[DONE]"
    at: float  # perf_counter() when read


async def read_sse(response: aiohttp.ClientResponse) -> list[SSEEvent]:
    """Every `data:` event of an SSE response, in order, each with its arrival time."""
    events = []
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            assert raw.startswith(b"data: "), raw
            payload = raw[len(b"data: ") :].decode()
            events.append(
                SSEEvent(payload if payload == "[DONE]" else json.loads(payload), time.perf_counter())
            )
    assert buffer == b"", buffer
    return events


def joined_text(events: Sequence[SSEEvent], index: int = 0) -> str:
    """The streamed text of one choice (completions `text` or chat `delta.content`)."""
    parts = []
    for event in events:
        if event.data == "[DONE]" or "choices" not in event.data:
            continue
        for choice in event.data["choices"]:
            if choice["index"] == index:
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)
