"""FuDG (DistServe-style full disaggregation) on top of an instance service: prefill and decode roles.

Prefill role (engine built with `EngineConfig(kv_export=True)`): when a request's prefill produced its
first token, the engine hands the request out (`RequestOutput.kv_payload`, finish reason "transferred").
`PrefillRole.hand_off` then publishes that first token to the router itself (so TTFT is real), ships the KV
as KvChunks to the decode instance the coordinator chose, waits for its KvTransferAck, and publishes a
KvTransferReport (bytes, seconds). If the decode instance refuses or nobody listens, the prefill instance
imports the payload into its own engine and decodes the request itself; tokens are the same either way.

Decode role: reassembles KvChunks on `{p}.instance.{id}.kv`, has the host hold the request (its chunks
continue the `seq` numbering), imports the payload into the engine, and acks. From then on the request is
an ordinary request of the decode instance: tokens, aborts, drain and status go through the service.

Both roles talk to the service only through `FudgHost` (the hook service.py implements).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.instance.engine.async_engine import AsyncEngine, EngineDeadError
from services.instance.engine.kv_transfer import KvPayload, check_import
from services.instance.engine.llm_engine import RequestOutput
from services.instance.kv_wire import payload_of, to_transfer
from services.instance.token_stream import ChunkBuilder
from shared import subjects
from shared.kv_messages import (
    ChunkAssembler,
    KvChunk,
    KvHandoffSkipped,
    KvTransfer,
    KvTransferAck,
    KvTransferReport,
    split_transfer,
)
from shared.messages import AbortRequest, DispatchRequest, ErrorReply, RemoteError, decode_reply
from shared.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)

DEFAULT_ACK_TIMEOUT = 30.0  # seconds for the decode instance to take a transfer
# nats-py drops messages of a subscription beyond this many queued bytes (128 MiB by default, less than the
# KV of one long prompt in fp32): chunks queue while an import waits for an engine step.
KV_PENDING_BYTES = 1024**3
_MOVED_MEMORY = 10_000  # transferred request ids remembered for forwarding aborts


class FudgHost(Protocol):
    """What the roles need from the instance service."""

    instance_id: str
    prefix: str
    engine: AsyncEngine

    @property
    def nc(self) -> NATS: ...

    @property
    def accepting(self) -> bool:
        """Whether the service takes new requests (not draining or stopping)."""
        ...

    def to_unix(self, engine_time: float) -> float: ...

    def from_unix(self, unix_time: float) -> float: ...

    def adopt(self, request: DispatchRequest, builder: ChunkBuilder) -> None:
        """Hold `request` as if it had been dispatched here, without adding it to the engine (the caller
        imports it next): its outputs are published with `builder`. Raises ValueError for an id it holds."""
        ...

    def fail(self, request_id: str, message: str) -> None:
        """End a held request with an error chunk and stop holding it (nothing for an id it does not hold)."""
        ...


def decode_instance_of(request: DispatchRequest) -> str | None:
    """The decode instance the coordinator chose (None for non-FuDG dispatches)."""
    return request.decode_instance_id


@dataclass
class TransferTotals:
    """Cumulative counters of one prefill role (for status reports and metrics)."""

    transfers: int = 0
    refused: int = 0  # decoded locally instead
    failed: int = 0
    kv_bytes: int = 0
    wire_bytes: int = 0
    transfer_seconds: float = 0.0


class PrefillRole:
    def __init__(
        self,
        host: FudgHost,
        *,
        route: Callable[[DispatchRequest], str | None] = decode_instance_of,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_message_bytes: int | None = None,  # default: the NATS server's max_payload
    ):
        self.host = host
        self.route = route
        self.ack_timeout = ack_timeout
        self.max_message_bytes = max_message_bytes
        self.totals = TransferTotals()
        self.reports: deque[KvTransferReport] = deque(maxlen=1000)  # the latest ones, newest last
        # Dispatched here and not handed off or ended yet, with the builder their chunks are numbered by.
        self._requests: dict[str, tuple[DispatchRequest, ChunkBuilder]] = {}
        self._moved: OrderedDict[str, str] = OrderedDict()  # request id → decode instance
        self._in_flight: set[str] = set()
        self._aborted: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the service's hook ---------------------------------------------------------------------------------

    def track(self, request: DispatchRequest, builder: ChunkBuilder) -> None:
        """A request was dispatched here (call after the engine took it); `builder` numbers its chunks."""
        self._requests[request.request_id] = (request, builder)

    def forget(self, request_id: str) -> None:
        """A tracked request ended here (finished, aborted, failed) without being handed off: say so, so the
        coordinator drops the KV reservation it holds for it on the decode instance."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        decode_id = self.route(tracked[0])
        if decode_id is None or decode_id == self.host.instance_id:
            return
        skipped = KvHandoffSkipped(
            request_id=request_id,
            prefill_instance_id=self.host.instance_id,
            decode_instance_id=decode_id,
            time=time.time(),
        )
        task = asyncio.ensure_future(
            self.host.nc.publish(subjects.kv_transfers(self.host.prefix), encode(skipped))
        )
        task.add_done_callback(_log_failure)

    def on_transferred(self, out: RequestOutput) -> bool:
        """The engine handed out a request (`out.kv_payload` set): hand it off in the background, and True:
        the service stops holding it (without a terminal chunk); `wait_idle` covers the transfer. False when
        the request is not tracked (it ended meanwhile, e.g. aborted: the payload is dropped)."""
        tracked = self._requests.pop(out.request_id, None)
        if tracked is None:
            return False
        request, builder = tracked
        self._in_flight.add(out.request_id)  # no gap in which an abort finds the request nowhere
        task = asyncio.create_task(self.hand_off(request, builder, out), name=f"ecoserve-kv-{out.request_id}")
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._task_done)
        return True

    @property
    def idle(self) -> bool:
        """No hand-off is under way."""
        return not self._tasks

    async def wait_idle(self) -> None:
        """Until no hand-off is under way (the service drains transfers before it leaves)."""
        await self._idle.wait()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("KV hand-off failed", exc_info=task.exception())

    # -- hand-off -------------------------------------------------------------------------------------------

    async def hand_off(self, request: DispatchRequest, builder: ChunkBuilder, out: RequestOutput) -> None:
        """Handle `out`, a request's output carrying its KV payload: first token to the router, then the
        KV to the decode instance (or, failing that, into this engine). Ends the request's stream with an
        error chunk rather than raising."""
        payload = out.kv_payload
        if payload is None:
            raise ValueError(f"output of {out.request_id} carries no KV payload")
        rid = request.request_id
        self._in_flight.add(rid)  # from here an abort waits for the outcome (see forward_aborts)
        try:
            first = builder.from_output(replace(out, finished=False, finish_reason=None, kv_payload=None))
            await self.host.nc.publish(request.reply_subject, encode(first))
            decode_id = self.route(request)
            if decode_id is None or decode_id == self.host.instance_id:
                await self._keep(request, builder, payload, "no decode instance named")
            else:
                await self._ship(request, builder, payload, decode_id)
        except Exception as exc:  # NATS closed under us, or a bug: end the stream if we still can
            log.exception("request %s: KV hand-off failed", rid)
            self.totals.failed += 1
            with contextlib.suppress(Exception):
                await self.host.nc.publish(
                    request.reply_subject, encode(builder.error(f"KV hand-off: {exc!r}"))
                )
        finally:
            self._in_flight.discard(rid)
            if rid in self._aborted:  # the router aborted it while it was on its way
                self._aborted.discard(rid)
                if rid in self._moved:
                    await self.forward_aborts([rid], "aborted during the KV transfer")
                else:  # it stayed here
                    self.host.engine.abort(rid)
                    self.host.fail(rid, "aborted")

    async def forward_aborts(self, request_ids: list[str], reason: str) -> list[str]:
        """Send aborts for requests this instance handed to a decode instance (a request still on its way is
        aborted once the decode instance took it); returns the ids it knew. The service calls it with the
        ids of an AbortRequest it does not hold itself."""
        known: list[str] = []
        by_decode: dict[str, list[str]] = {}
        for request_id in request_ids:
            if request_id in self._in_flight:
                self._aborted.add(request_id)
                known.append(request_id)
            elif (decode_id := self._moved.get(request_id)) is not None:
                by_decode.setdefault(decode_id, []).append(request_id)
                known.append(request_id)
        for decode_id, ids in by_decode.items():
            abort = AbortRequest(request_ids=ids, reason=reason)
            await self.host.nc.publish(subjects.instance_abort(self.host.prefix, decode_id), encode(abort))
        return known

    async def _ship(
        self, request: DispatchRequest, builder: ChunkBuilder, payload: KvPayload, decode_id: str
    ):
        nc = self.host.nc
        transfer = to_transfer(
            payload,
            request,
            prefill_instance_id=self.host.instance_id,
            decode_instance_id=decode_id,
            next_seq=builder.next_seq,
            queue_time=builder.queue_time,
            first_token_time=builder.first_token_time,
            sent_at=time.time(),
        )
        limit = self.max_message_bytes or nc.max_payload
        pieces = split_transfer(transfer, f"{request.request_id}-{uuid.uuid4().hex[:8]}", limit)
        subject = subjects.instance_kv(self.host.prefix, decode_id)
        start = time.perf_counter()
        ack: KvTransferAck | None = None
        reason = ""
        try:
            for piece in pieces[:-1]:
                await nc.publish(subject, piece)
            reply = await nc.request(subject, pieces[-1], timeout=self.ack_timeout)
            ack = decode_reply(reply.data, KvTransferAck)
        except nats.errors.NoRespondersError:
            reason = f"decode instance {decode_id} is not listening"
        except (RemoteError, WireError) as exc:
            reason = f"decode instance {decode_id} answered {exc}"
        except (nats.errors.TimeoutError, TimeoutError):
            # It may hold the request after all: stop it there, and end the stream here.
            self.totals.failed += 1
            abort = AbortRequest(request_ids=[request.request_id], reason="KV transfer timed out")
            await nc.publish(subjects.instance_abort(self.host.prefix, decode_id), encode(abort))
            message = f"KV transfer to {decode_id} not acknowledged within {self.ack_timeout}s"
            log.error("request %s: %s", request.request_id, message)
            await nc.publish(request.reply_subject, encode(builder.error(message)))
            return
        seconds = time.perf_counter() - start
        accepted = ack is not None and ack.accepted
        self._record(
            KvTransferReport(
                request_id=request.request_id,
                prefill_instance_id=self.host.instance_id,
                decode_instance_id=decode_id,
                accepted=accepted,
                num_tokens=payload.num_tokens,
                kv_bytes=payload.kv_bytes,
                wire_bytes=sum(len(p) for p in pieces),
                num_chunks=len(pieces),
                export_seconds=payload.export_seconds,
                transfer_seconds=seconds,
                import_seconds=ack.import_seconds if ack is not None else 0.0,
                time=time.time(),
            )
        )
        if accepted:
            self._remember(request.request_id, decode_id)
            return
        await self._keep(request, builder, payload, reason or (ack.reason if ack else None) or "refused")

    async def _keep(self, request: DispatchRequest, builder: ChunkBuilder, payload: KvPayload, why: str):
        """Decode the request here after all: import the payload back into this engine."""
        log.warning("request %s: decoding on the prefill instance (%s)", request.request_id, why)
        self.totals.refused += 1
        try:
            await import_held(self.host, request, builder, payload)
        except ValueError as exc:  # this service will not take it either (draining): end the stream
            self.totals.failed += 1
            await self.host.nc.publish(request.reply_subject, encode(builder.error(f"cannot decode: {exc}")))

    def _record(self, report: KvTransferReport) -> None:
        totals = self.totals
        totals.transfers += 1
        totals.kv_bytes += report.kv_bytes
        totals.wire_bytes += report.wire_bytes
        totals.transfer_seconds += report.transfer_seconds
        self.reports.append(report)
        log.info(
            "request %s: KV of %d tokens (%d bytes, %d chunks) to %s in %.2f ms (import %.2f ms)%s",
            report.request_id,
            report.num_tokens,
            report.wire_bytes,
            report.num_chunks,
            report.decode_instance_id,
            report.transfer_seconds * 1e3,
            report.import_seconds * 1e3,
            "" if report.accepted else ", refused",
        )
        task = asyncio.ensure_future(
            self.host.nc.publish(subjects.kv_transfers(self.host.prefix), encode(report))
        )
        task.add_done_callback(_log_failure)

    def _remember(self, request_id: str, decode_id: str) -> None:
        self._moved[request_id] = decode_id
        while len(self._moved) > _MOVED_MEMORY:
            self._moved.popitem(last=False)


class DecodeRole:
    def __init__(self, host: FudgHost, *, max_pending: int = 64):
        self.host = host
        self.assembler = ChunkAssembler(max_pending)
        self.imported = 0
        self.recomputed = 0  # accepted without room for the KV
        self._sub: Subscription | None = None
        self._imports: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Subscribe to this instance's KV subject (call before the service announces itself)."""
        subject = subjects.instance_kv(self.host.prefix, self.host.instance_id)
        self._sub = await self.host.nc.subscribe(
            subject, cb=self._on_chunk, pending_bytes_limit=KV_PENDING_BYTES
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_chunk(self, msg: Msg) -> None:
        try:
            done = self.assembler.add(decode(msg.data, KvChunk))
        except WireError as exc:
            log.warning("dropped a KV chunk: %s", exc)
            await _respond(msg, ErrorReply.from_wire_error(exc))
            return
        if done is None:
            return
        # Import in a task: the next transfer's chunks need not wait for this one's engine step.
        task = asyncio.create_task(self._finish(msg, *done, time.perf_counter()))
        self._imports.add(task)
        task.add_done_callback(self._imports.discard)

    async def _finish(self, msg: Msg, transfer: KvTransfer, size: int, start: float) -> None:
        ack = await self._take(transfer)
        ack = replace(ack, received_bytes=size, import_seconds=time.perf_counter() - start)
        await _respond(msg, ack)

    async def _take(self, transfer: KvTransfer) -> KvTransferAck:
        request = transfer.request

        def refuse(reason: str) -> KvTransferAck:
            log.warning("refused the KV of %s: %s", request.request_id, reason)
            return KvTransferAck(
                request_id=request.request_id,
                instance_id=self.host.instance_id,
                accepted=False,
                reason=reason,
            )

        if not self.host.accepting or not self.host.engine.is_running:
            return refuse(f"instance {self.host.instance_id} is not taking requests")
        if transfer.decode_instance_id != self.host.instance_id:
            return refuse(f"sent to {transfer.decode_instance_id}, this is {self.host.instance_id}")
        payload = payload_of(transfer)
        builder = ChunkBuilder(request.request_id, len(request.prompt_token_ids), self.host.to_unix)
        builder.next_seq = transfer.next_seq
        builder.completion_tokens = len(transfer.output_token_ids)
        builder.queue_time = transfer.queue_time
        builder.first_token_time = transfer.first_token_time
        try:
            check_import(self.host.engine.engine, payload)  # read-only, like validate_request
            imported = await import_held(self.host, request, builder, payload)
        except (ValueError, EngineDeadError) as exc:
            return refuse(str(exc))
        if imported is not None:
            self.imported += 1
            self.recomputed += not imported
        # Accepted even when the import failed after the host took the request: it ended the stream itself.
        return KvTransferAck(
            request_id=request.request_id,
            instance_id=self.host.instance_id,
            accepted=True,
            kv_imported=bool(imported),
            reason=None if imported is not None else "the import failed; the stream ended with an error",
        )


async def import_held(
    host: FudgHost, request: DispatchRequest, builder: ChunkBuilder, payload: KvPayload
) -> bool | None:
    """Have the host hold `request`, then continue it in the engine from `payload`. True: its KV was
    imported; False: it waits for recomputation; None: the import failed after the host took the request,
    which then ended it with an error chunk. Raises ValueError when the host holds the id already."""
    host.adopt(request, builder)  # before the import: the next step's outputs must find the request held
    arrival = host.from_unix(request.arrival_time)
    first = None if builder.first_token_time is None else host.from_unix(builder.first_token_time)
    try:
        return await host.engine.call(lambda engine: engine.import_request(payload, arrival, first))
    except (ValueError, EngineDeadError) as exc:
        host.fail(request.request_id, f"KV import failed: {exc}")
        return None


async def _respond(msg: Msg, reply: Message) -> None:
    if not msg.reply:
        return  # an intermediate chunk: nobody waits for an answer
    try:
        await msg.respond(encode(reply))
    except nats.errors.Error as exc:
        log.warning("could not answer on %s: %r", msg.reply, exc)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not publish a KV transfer report: %r", task.exception())
