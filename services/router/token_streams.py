"""Demultiplexes this router's token subject into per-HTTP-request event queues.

Every request this router owns names `router_tokens(prefix, router_id)` as its reply subject, so one
subscription carries all their TokenChunks (an instance sends one step's chunks for this router as one
TokenBatch). A request's sub-requests (prompts × n) share one asyncio.Queue,
registered before the SubmitRequest goes out: an instance may publish tokens before the coordinator's ack
reaches us. This module also enforces the stream contract: `seq` runs 0, 1, 2, … (a gap means a lost chunk
and ends that request with an error), a chunk with `error` is terminal, and an `InstanceLost` broadcast ends
every stream held by that instance. Malformed messages are logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import subjects
from shared.messages import InstanceLost, TokenChunk, decode_token_chunks
from shared.wire import WireError, decode

log = logging.getLogger(__name__)

_RECENTLY_LOST = 256  # lost instance ids remembered, for acks that arrive after the broadcast


@dataclass(frozen=True)
class ChunkEvent:
    index: int  # the choice this sub-request feeds
    chunk: TokenChunk
    received: float  # perf_counter() on arrival, for latency metrics


@dataclass(frozen=True)
class FailureEvent:
    index: int
    message: str
    status: int  # the HTTP status a non-streaming response reports
    kind: str  # "instance_lost", "seq_gap", "instance_error": the metrics label


@dataclass(frozen=True)
class DisconnectEvent:
    """Put on a request's queue by its HTTP side when the client has gone away."""


Event = ChunkEvent | FailureEvent | DisconnectEvent


@dataclass
class Tracked:
    """A sub-request whose chunks this router is waiting for."""

    request_id: str
    index: int
    queue: asyncio.Queue[Event]
    prompt_tokens: int
    tracked_at: float  # monotonic
    instance_id: str | None = None  # known from the SubmitAck
    next_seq: int = 0
    output_tokens: int = 0
    failed: bool = False


class TokenStreams:
    def __init__(self, nc: NATS, prefix: str, router_id: str):
        self._nc = nc
        self._prefix = prefix
        self.subject = subjects.router_tokens(prefix, router_id)
        self._tracked: dict[str, Tracked] = {}
        self._lost: OrderedDict[str, tuple[str, float]] = OrderedDict()  # instance_id → (reason, monotonic)
        self._subscriptions: list[Subscription] = []
        self.malformed = 0  # messages dropped because they did not decode

    async def start(self) -> None:
        self._subscriptions = [
            await self._nc.subscribe(self.subject, cb=self._on_tokens),
            await self._nc.subscribe(subjects.instance_lost(self._prefix), cb=self._on_instance_lost),
        ]
        # Later publishes on this connection (our SubmitRequests) reach the server after these SUBs, so no
        # instance learns our subject before we listen on it; the flush only surfaces a dead connection now.
        await self._nc.flush()

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions = []

    def tracked(self) -> list[Tracked]:
        return list(self._tracked.values())

    def track(self, request_id: str, index: int, queue: asyncio.Queue[Event], prompt_tokens: int) -> Tracked:
        entry = Tracked(
            request_id=request_id,
            index=index,
            queue=queue,
            prompt_tokens=prompt_tokens,
            tracked_at=time.monotonic(),
        )
        self._tracked[request_id] = entry
        return entry

    def untrack(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)

    def assign(self, request_id: str, instance_id: str) -> None:
        """Record where a request runs (for InstanceLost); fail it at once if that instance was lost while the
        request was being submitted (the coordinator may have dispatched to it just before noticing)."""
        entry = self._tracked.get(request_id)
        if entry is None:
            return
        entry.instance_id = instance_id
        lost = self._lost.get(instance_id)
        if lost is not None and lost[1] >= entry.tracked_at:
            self._fail(entry, f"instance {instance_id} was lost: {lost[0]}", 503, "instance_lost")

    def _fail(self, entry: Tracked, message: str, status: int, kind: str) -> None:
        entry.failed = True
        self.untrack(entry.request_id)
        entry.queue.put_nowait(FailureEvent(entry.index, message, status, kind))

    async def _on_tokens(self, msg: Msg) -> None:
        received = time.perf_counter()
        try:
            chunks = decode_token_chunks(msg.data)
        except WireError as error:
            self.malformed += 1
            log.warning("dropping a malformed message on %s: %s", msg.subject, error)
            return
        for chunk in chunks:
            self._deliver(chunk, received)

    def _deliver(self, chunk: TokenChunk, received: float) -> None:
        entry = self._tracked.get(chunk.request_id)
        if entry is None:
            # Expected after an abort or a stop string: the instance had chunks in flight.
            log.debug("dropping a chunk of untracked request %s (seq %d)", chunk.request_id, chunk.seq)
            return
        if chunk.error is not None or chunk.finish_reason == "error":
            detail = chunk.error or "the instance ended the request with an error"
            self._fail(
                entry, f"generation failed on instance {entry.instance_id}: {detail}", 500, "instance_error"
            )
            return
        if chunk.seq != entry.next_seq:
            self._fail(
                entry,
                f"lost token chunks of request {chunk.request_id}: "
                f"expected seq {entry.next_seq}, got {chunk.seq}",
                500,
                "seq_gap",
            )
            return
        entry.next_seq += 1
        entry.output_tokens += len(chunk.token_ids)
        if chunk.finished:
            self.untrack(chunk.request_id)
        entry.queue.put_nowait(ChunkEvent(entry.index, chunk, received))

    async def _on_instance_lost(self, msg: Msg) -> None:
        try:
            lost = decode(msg.data, InstanceLost)
        except WireError as error:
            self.malformed += 1
            log.warning("dropping a malformed message on %s: %s", msg.subject, error)
            return
        self._lost[lost.instance_id] = (lost.reason, time.monotonic())
        self._lost.move_to_end(lost.instance_id)
        while len(self._lost) > _RECENTLY_LOST:
            self._lost.popitem(last=False)
        victims = [entry for entry in self._tracked.values() if entry.instance_id == lost.instance_id]
        if victims:
            log.warning(
                "instance %s lost (%s): failing %d requests", lost.instance_id, lost.reason, len(victims)
            )
        for entry in victims:
            self._fail(entry, f"instance {lost.instance_id} was lost: {lost.reason}", 503, "instance_lost")
