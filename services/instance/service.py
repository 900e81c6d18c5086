"""The instance service: one engine behind NATS.

It listens on its three subjects (DispatchRequest, AbortRequest, InstanceControl), registers with a
coordinator, streams each request's tokens to the router that owns it, and reports its status after engine
steps and as a heartbeat. Shutting down (SIGTERM, the `shutdown` command, a dead engine) drains: no new
requests, held ones get `drain_timeout` seconds to finish, the rest end with an error chunk, then the
instance deregisters and closes.

The engine runs in its own thread (AsyncEngine); everything here runs on the event loop and never waits for
a step, so heartbeats and replies keep flowing during a long prefill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.infra.nats_sync import synced
from services.instance.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from services.instance.engine.llm_engine import EngineStats, RequestOutput
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.registration import register_until_accepted
from services.instance.status import ProgressBook, StatusReporter, phase_of
from services.instance.token_stream import ChunkBuilder, pump
from shared import subjects
from shared.config import InstanceConfig
from shared.messages import (
    AbortRequest,
    AdminReply,
    DeregisterInstance,
    DispatchAck,
    DispatchRequest,
    ErrorReply,
    InstanceControl,
    InstanceInfo,
    InstanceState,
    InstanceStatus,
    TokenChunk,
)
from shared.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_REGISTER_INTERVAL = 0.5
UNAVAILABLE_RETRY_AFTER = 1.0  # seconds, in the ErrorReply that turns a dispatch away while draining
LEFTOVER_TIMEOUT = 5.0  # seconds for aborted requests to publish their final chunk at shutdown
# A publish subject: dot-separated non-empty tokens without whitespace or wildcards.
_PUBLISH_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


class InstanceService:
    """Run with `await start()` … `await stop()` (or `async with`); `wait_stopped()` returns once a
    shutdown (signal, control command, dead engine) has completed."""

    def __init__(
        self,
        config: InstanceConfig,
        engine: AsyncEngine,
        model_name: str,
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        register_interval: float = DEFAULT_REGISTER_INTERVAL,
    ):
        if drain_timeout < 0:
            raise ValueError(f"drain_timeout must be non-negative, got {drain_timeout}")
        if register_interval <= 0:
            raise ValueError(f"register_interval must be positive, got {register_interval}")
        self.config = config
        self.engine = engine
        self.model_name = model_name
        self.drain_timeout = drain_timeout
        self.register_interval = register_interval
        self.state: InstanceState = "starting"
        self.macro_instance_id: str | None = None
        self.registered = asyncio.Event()  # set once a coordinator accepted the registration
        self.exit_code = 0  # 1 when the engine died
        self._started_at = time.time()
        self._unix_offset = 0.0
        self._nc: NATS | None = None
        self._streams: dict[str, asyncio.Task[None]] = {}  # held requests, by id
        self._failures: dict[str, str] = {}  # request id → why the instance ended it (shutdown)
        self._progress = ProgressBook(self._to_unix)
        self._reporter = StatusReporter(self._publish_status, config.heartbeat_interval)
        self._register_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._cut_drain = asyncio.Event()
        self._stopped = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, connect, listen, begin heartbeats and registration (which retries on its own)."""
        self.engine.start()
        if self.engine.clock is not time.time:  # report unix times whatever clock the engine runs on
            self._unix_offset = time.time() - self.engine.clock()
        self.engine.add_step_listener(self._on_step)
        self._nc = await nats.connect(
            self.config.nats_url,
            name=f"ecoserve-{self.config.instance_id}",
            max_reconnect_attempts=-1,  # an instance outlives NATS restarts; subscriptions are restored
            reconnect_time_wait=1,
            connect_timeout=5,
            error_cb=_on_nats_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=_on_reconnected,
        )
        prefix, instance_id = self.config.prefix, self.config.instance_id
        await self._nc.subscribe(subjects.instance_requests(prefix, instance_id), cb=self._on_dispatch)
        await self._nc.subscribe(subjects.instance_abort(prefix, instance_id), cb=self._on_abort)
        await self._nc.subscribe(subjects.instance_control(prefix, instance_id), cb=self._on_control)
        await synced(self._nc)  # subscribed at the server before anyone learns our subjects
        self._reporter.start()
        self._start_registration()
        log.info("instance %s serving %s (prefix %s)", instance_id, self.model_name, prefix)

    def request_shutdown(self, reason: str) -> None:
        """Begin a graceful shutdown; asked again while draining, stop waiting for held requests."""
        if self._stopped.is_set():
            return
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown(reason), name="ecoserve-shutdown")
        else:
            log.info("shutdown requested again (%s): failing held requests now", reason)
            self._cut_drain.set()

    async def stop(self, reason: str = "stopped") -> None:
        """Shut down gracefully (see the module docstring) and wait until done."""
        self.request_shutdown(reason)
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> InstanceService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _shutdown(self, reason: str) -> None:
        log.info("shutting down (%s): draining %d held requests", reason, len(self._streams))
        self.state = "draining"
        if self._register_task is not None:
            self._register_task.cancel()
        self._reporter.poke()
        try:
            await self._drain_held()
            self.state = "stopping"
            await self._fail_leftovers(f"instance {self.config.instance_id} shut down ({reason})")
            await self._leave(reason)
        finally:
            await self.engine.shutdown()
            self._stopped.set()
            log.info("instance %s stopped", self.config.instance_id)

    async def _drain_held(self) -> None:
        held = list(self._streams.values())
        if not held:
            return
        finished = asyncio.create_task(asyncio.wait(held))
        cut = asyncio.create_task(self._cut_drain.wait())
        await asyncio.wait([finished, cut], timeout=self.drain_timeout, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()  # cancels only the waiting, not the streams
        cut.cancel()

    async def _fail_leftovers(self, message: str) -> None:
        leftovers = list(self._streams.items())
        if not leftovers:
            return
        log.warning("failing %d requests still running after the drain", len(leftovers))
        for request_id, _ in leftovers:
            self._failures[request_id] = message
            self.engine.abort(request_id)
        await asyncio.wait([task for _, task in leftovers], timeout=LEFTOVER_TIMEOUT)

    async def _leave(self, reason: str) -> None:
        """Final status, DeregisterInstance, then close NATS after everything queued went out."""
        await self._reporter.stop()
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            await self._reporter.report_now()
            await nc.publish(
                subjects.deregister(self.config.prefix),
                encode(DeregisterInstance(instance_id=self.config.instance_id, reason=reason)),
            )
            await nc.drain()  # answers what is queued on our subjects (unavailable), flushes, closes
            log.info("deregistered from the cluster")
        except nats.errors.Error as exc:
            log.warning("could not deregister cleanly: %r", exc)
            await nc.close()

    # -- registration ---------------------------------------------------------------------------------------

    def _start_registration(self) -> None:
        if self._register_task is None or self._register_task.done():
            self._register_task = asyncio.create_task(self._register(), name="ecoserve-register")

    async def _register(self) -> None:
        assert self._nc is not None
        ack = await register_until_accepted(self._nc, self.config.prefix, self._info, self.register_interval)
        self.macro_instance_id = ack.macro_instance_id
        if self.state == "starting":
            self.state = "ready"
        log.info(
            "instance %s joined macro instance %s (lease %.1fs)",
            self.config.instance_id,
            ack.macro_instance_id,
            ack.lease_seconds,
        )
        if 2 * self.config.heartbeat_interval > ack.lease_seconds:
            log.warning(
                "heartbeat interval %.2fs is more than half the %.1fs lease: one late report loses the lease",
                self.config.heartbeat_interval,
                ack.lease_seconds,
            )
        self.registered.set()
        self._reporter.poke()  # the coordinator learns "ready" now, not at the next heartbeat

    def _info(self) -> InstanceInfo:
        stats = self.engine.stats()
        return InstanceInfo(
            instance_id=self.config.instance_id,
            model=self.model_name,
            subjects=subjects.instance_subjects(self.config.prefix, self.config.instance_id),
            kv_blocks_total=stats.kv_blocks_total,
            block_size=stats.block_size,
            max_model_len=stats.max_model_len,
            policy=stats.policy,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=self._started_at,
        )

    # -- requests -------------------------------------------------------------------------------------------

    async def _on_dispatch(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, DispatchRequest)
        except WireError as exc:
            log.warning("malformed DispatchRequest: %s", exc)
            await _respond(msg, ErrorReply.from_wire_error(exc))
            return
        await _respond(msg, self._accept(request))

    def _accept(self, request: DispatchRequest) -> Message:
        """Queue the request in the engine and start streaming its tokens, or say why not."""
        if self.state not in ("starting", "ready"):  # "starting": a dispatch may overtake our RegisterAck
            return ErrorReply(
                code="unavailable",
                message=f"instance {self.config.instance_id} is {self.state}",
                retry_after=UNAVAILABLE_RETRY_AFTER,
            )
        if request.instance_id != self.config.instance_id:
            return _bad_request("instance_id", f"this is instance {self.config.instance_id!r}")
        if _PUBLISH_SUBJECT.fullmatch(request.reply_subject) is None:
            return _bad_request("reply_subject", f"{request.reply_subject!r} is not a publish subject")
        if request.request_id in self._streams:
            return _bad_request("request_id", f"request {request.request_id!r} is already running here")
        try:
            params = SamplingParams.from_dict(request.sampling)
            stream = self.engine.add_request(request.request_id, request.prompt_token_ids, params)
        except ParameterError as exc:
            return _bad_request(exc.field, exc.message)
        except EngineDeadError as exc:
            self._engine_died(str(exc))
            return ErrorReply(code="unavailable", message=str(exc), retry_after=UNAVAILABLE_RETRY_AFTER)
        except (ValueError, TypeError) as exc:
            return _bad_request(None, str(exc))
        prompt_tokens = len(request.prompt_token_ids)
        self._progress.add(request.request_id, prompt_tokens, request.arrival_time)
        builder = ChunkBuilder(request.request_id, prompt_tokens, self._to_unix)
        self._streams[request.request_id] = asyncio.create_task(
            self._stream(request, stream, builder), name=f"ecoserve-stream-{request.request_id}"
        )
        return DispatchAck(request_id=request.request_id, instance_id=self.config.instance_id, accepted=True)

    async def _stream(self, request: DispatchRequest, stream: RequestStream, builder: ChunkBuilder) -> None:
        request_id = request.request_id
        nc = self._nc
        assert nc is not None

        async def publish(chunk: TokenChunk) -> None:
            await nc.publish(request.reply_subject, encode(chunk))

        try:
            died = await pump(stream, builder, publish, lambda: self._failures.get(request_id))
            if died is not None:
                self._engine_died(died)
        except Exception:  # NATS closed under us, or a bug: the request cannot be served either way
            log.exception("request %s: streaming failed", request_id)
            self.engine.abort(request_id)  # free its KV blocks; nobody can read its tokens
        finally:
            self._streams.pop(request_id, None)
            self._failures.pop(request_id, None)
            self._progress.remove(request_id)
            self._reporter.poke()

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort = decode(msg.data, AbortRequest)
        except WireError as exc:
            log.warning("dropped a malformed AbortRequest: %s", exc)
            return
        for request_id in abort.request_ids:
            if request_id in self._streams:  # unknown ids: finished already, or never here
                log.info("aborting %s: %s", request_id, abort.reason)
                self.engine.abort(request_id)
                self._progress.remove(request_id)

    # -- control --------------------------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        try:
            control = decode(msg.data, InstanceControl)
        except WireError as exc:
            log.warning("malformed InstanceControl: %s", exc)
            await _respond(msg, ErrorReply.from_wire_error(exc))
            return
        log.info("control command %r", control.command)
        error: str | None = None
        if control.command == "register":
            if self._shutdown_task is not None:
                error = f"instance is {self.state}: shutting down"
            else:
                # Answer now, register in the background: the coordinator may be waiting for this reply
                # before it reads the RegisterInstance.
                self._start_registration()
        elif control.command == "drain":
            if self.state in ("starting", "ready"):
                self.state = "draining"
        elif control.command == "resume":
            if self._shutdown_task is not None:
                error = f"instance is {self.state}: shutting down"
            elif self.state == "draining":
                self.state = "ready" if self.registered.is_set() else "starting"
        elif control.command == "shutdown":
            self.request_shutdown("shutdown command")
        self._reporter.poke()
        await _respond(msg, AdminReply(ok=error is None, result=self._summary(), error=error))

    def _summary(self) -> dict[str, object]:
        return {
            "instance_id": self.config.instance_id,
            "state": self.state,
            "macro_instance_id": self.macro_instance_id,
            "num_requests": len(self._streams),
        }

    # -- status ---------------------------------------------------------------------------------------------

    def _on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self._progress.update(outputs)
        self._reporter.poke()

    async def _publish_status(self, seq: int, now: float) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return  # nats-py buffers while reconnecting, but a stale heartbeat is worth nothing
        stats = self.engine.stats()
        status = InstanceStatus(
            instance_id=self.config.instance_id,
            seq=seq,
            time=now,
            state=self.state,
            phase=phase_of(stats),
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_blocks_free=stats.kv_blocks_free,
            kv_blocks_total=stats.kv_blocks_total,
            num_preemptions=stats.num_preemptions,
            requests=self._progress.snapshot(),
        )
        await nc.publish(subjects.status(self.config.prefix, self.config.instance_id), encode(status))

    # -- helpers --------------------------------------------------------------------------------------------

    def _engine_died(self, message: str) -> None:
        if self.exit_code == 0:
            log.error("the engine died (%s): leaving the cluster", message)
            self.exit_code = 1
        self.request_shutdown("engine died")

    async def _on_disconnected(self) -> None:
        if self._shutdown_task is None:  # closing at shutdown disconnects too
            log.warning("NATS disconnected; reconnecting")

    def _to_unix(self, engine_time: float) -> float:
        return engine_time + self._unix_offset


def _bad_request(field: str | None, message: str) -> ErrorReply:
    return ErrorReply(code="bad_request", message=message, field=field)


async def _respond(msg: Msg, reply: Message) -> None:
    if not msg.reply:
        log.warning("%s arrived without a reply subject; not answered", msg.subject)
        return
    try:
        await msg.respond(encode(reply))
    except nats.errors.Error as exc:
        log.warning("could not answer on %s: %r", msg.reply, exc)


async def _on_nats_error(exc: Exception) -> None:
    log.warning("NATS: %r", exc)


async def _on_reconnected() -> None:
    log.info("NATS reconnected")
