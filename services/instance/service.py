"""The instance service: one engine behind NATS.

It listens on its three subjects (DispatchRequest, AbortRequest, InstanceControl or PrefillWindow),
registers with a coordinator (announcing its prefill profile, measured at start-up when the policy is
padg), streams each request's tokens to the router that owns it (StepPublisher: one step's chunks at once),
and reports its status after engine steps and as a heartbeat. Shutting down (SIGTERM, the `shutdown`
command, a dead engine) drains: no new requests, held ones get `config.drain_timeout` seconds to finish, the
rest end with an error chunk, then the instance deregisters and closes.

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
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.infra.nats_sync import synced
from services.instance.engine.async_engine import AsyncEngine, EngineDeadError
from services.instance.engine.llm_engine import EngineStats, RequestOutput
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.fudg import DecodeRole, PrefillRole
from services.instance.prefill_window import PrefillWindowControl
from services.instance.registration import register_until_accepted
from services.instance.startup_profile import startup_profile, wants_profile
from services.instance.status import ProgressBook, StatusReporter, phase_of
from services.instance.step_publisher import StepPublisher
from services.instance.token_stream import ChunkBuilder
from shared import subjects
from shared.config import InstanceConfig
from shared.messages import (
    AbortRequest,
    AdminReply,
    DeregisterInstance,
    DispatchAck,
    DispatchRequest,
    ErrorReply,
    FudgRole,
    InstanceControl,
    InstanceInfo,
    InstanceState,
    InstanceStatus,
    PrefillWindow,
)
from shared.prefill_profile import PrefillProfile
from shared.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)

DEFAULT_REGISTER_INTERVAL = 0.5
UNAVAILABLE_RETRY_AFTER = 1.0  # seconds, in the ErrorReply that turns a dispatch away while draining
FLUSH_TIMEOUT = 5.0  # seconds for the queued token chunks to reach NATS at shutdown
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
        register_interval: float = DEFAULT_REGISTER_INTERVAL,
        profile_cache_dir: Path | None = None,
    ):
        """`profile_cache_dir`: where start-up prefill profiles are cached (None: always measure)."""
        if register_interval <= 0:
            raise ValueError(f"register_interval must be positive, got {register_interval}")
        self.config = config
        self.engine = engine
        self.model_name = model_name
        self.register_interval = register_interval
        self.state: InstanceState = "starting"
        self.macro_instance_id: str | None = None
        self.registered = asyncio.Event()  # set once a coordinator accepted the registration
        self.exit_code = 0  # 1 when the engine died
        self._started_at = time.time()
        self._unix_offset = 0.0
        self._nc: NATS | None = None
        self._profile_cache_dir = profile_cache_dir
        self.prefill_profile: PrefillProfile | None = None
        self._progress = ProgressBook(self._to_unix)
        self._reporter = StatusReporter(self._publish_status, config.heartbeat_interval)
        self._reported_shape: tuple[int, int, str] | None = None  # (running, waiting, phase) of the last news
        self._publisher = StepPublisher(self._send, engine.clock, self._on_request_end, self._on_request_lost)
        self._window = PrefillWindowControl(engine, self._publisher, self._reporter.poke)
        self._register_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._cut_drain = asyncio.Event()
        self._stopped = asyncio.Event()
        # FuDG roles (services/instance/fudg.py), set before start(); None on NoDG/PaDG instances.
        self.fudg_prefill: PrefillRole | None = None
        self.fudg_decode: DecodeRole | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, measure its prefill profile when wanted, connect, listen, begin heartbeats and
        registration (which retries on its own)."""
        self.engine.start()
        if self.engine.clock is not time.time:  # report unix times whatever clock the engine runs on
            self._unix_offset = time.time() - self.engine.clock()
        self.engine.add_step_listener(self._on_step)
        self.engine.add_death_listener(self._on_engine_dead)
        if wants_profile(self.config.profile_prefill, self.engine.stats().policy):
            await self._measure_profile()
        self._publisher.start()
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
        if self.fudg_decode is not None:
            await self.fudg_decode.start()
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

    async def _measure_profile(self) -> None:
        # Before anything is subscribed: no request shares the profile's steps. The engine thread measures,
        # so the event loop stays free.
        began = time.perf_counter()
        try:
            self.prefill_profile = await startup_profile(self.engine, self._profile_cache_dir)
        except (RuntimeError, ValueError) as exc:  # registering without a profile beats not serving at all
            log.error("could not measure the prefill profile: %s", exc)
            return
        log.info("prefill profile ready in %.1fs", time.perf_counter() - began)

    async def _shutdown(self, reason: str) -> None:
        log.info("shutting down (%s): draining %d held requests", reason, len(self._publisher))
        self.state = "draining"
        if self._register_task is not None:
            self._register_task.cancel()
        self._reporter.poke()
        try:
            await self._drain_held()
            self.state = "stopping"
            self._fail_leftovers(f"instance {self.config.instance_id} shut down ({reason})")
            await self._flush_tokens()
            await self._leave(reason)
        finally:
            await self.engine.shutdown()
            self._stopped.set()
            log.info("instance %s stopped", self.config.instance_id)

    async def _drain_held(self) -> None:
        prefill = self.fudg_prefill
        if not len(self._publisher) and (prefill is None or prefill.idle):
            return
        finished = asyncio.create_task(self._held_done())
        cut = asyncio.create_task(self._cut_drain.wait())
        await asyncio.wait(
            [finished, cut], timeout=self.config.drain_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        finished.cancel()
        cut.cancel()

    async def _held_done(self) -> None:
        """Until no request is held and no KV hand-off is under way (a refused one comes back here)."""
        while True:
            await self._publisher.wait_empty()
            if self.fudg_prefill is None:
                return
            await self.fudg_prefill.wait_idle()
            if not len(self._publisher):
                return

    def _fail_leftovers(self, message: str) -> None:
        leftovers = list(self._publisher)
        if leftovers:
            log.warning("failing %d requests still running after the drain", len(leftovers))
        for request_id in leftovers:
            self._publisher.fail(request_id, message)
            self.engine.abort(request_id)  # frees its KV blocks (the engine may be dead: then a no-op)

    async def _flush_tokens(self) -> None:
        """Every queued chunk to NATS before the connection drains."""
        try:
            await asyncio.wait_for(self._publisher.close(), FLUSH_TIMEOUT)
        except TimeoutError:
            log.warning("token chunks still unsent after %.1fs at shutdown", FLUSH_TIMEOUT)

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
            prefill_profile=None if self.prefill_profile is None else self.prefill_profile.to_dict(),
            role=self._role(),
        )

    def _role(self) -> FudgRole:
        if self.fudg_prefill is not None:
            return "prefill"
        return "decode" if self.fudg_decode is not None else "mixed"

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
        if request.request_id in self._publisher:
            return _bad_request("request_id", f"request {request.request_id!r} is already running here")
        try:
            params = SamplingParams.from_dict(request.sampling)
            self.engine.submit(request.request_id, request.prompt_token_ids, params)
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
        self._publisher.open(request.request_id, request.reply_subject, builder)
        if self.fudg_prefill is not None:
            self.fudg_prefill.track(request, builder)
        return DispatchAck(request_id=request.request_id, instance_id=self.config.instance_id, accepted=True)

    async def _send(self, subject: str, payload: bytes) -> None:
        nc = self._nc
        assert nc is not None
        await nc.publish(subject, payload)

    def _on_request_end(self, request_id: str) -> None:
        """The request's terminal chunk is queued: it is no longer held here."""
        if self.fudg_prefill is not None:
            self.fudg_prefill.forget(request_id)
        self._progress.remove(request_id)
        self._reporter.poke()

    def _on_request_lost(self, request_id: str) -> None:
        """A chunk could not be published: nobody can follow the request, so free its KV blocks."""
        self.engine.abort(request_id)
        self._on_request_end(request_id)

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort = decode(msg.data, AbortRequest)
        except WireError as exc:
            log.warning("dropped a malformed AbortRequest: %s", exc)
            return
        unknown: list[str] = []
        for request_id in abort.request_ids:
            if self._publisher.abort(request_id):  # unknown ids: finished already, or never here
                log.info("aborted %s: %s", request_id, abort.reason)
                self.engine.abort(request_id)
            else:
                unknown.append(request_id)
        if unknown and self.fudg_prefill is not None:  # FuDG: handed to a decode instance
            await self.fudg_prefill.forward_aborts(unknown, abort.reason)

    # -- control --------------------------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        try:
            control = decode(msg.data, (InstanceControl, PrefillWindow))
        except WireError as exc:
            log.warning("malformed control message: %s", exc)
            await _respond(msg, ErrorReply.from_wire_error(exc))
            return
        if isinstance(control, PrefillWindow):
            reply = await self._window.apply(control)
            if isinstance(reply, AdminReply):
                reply = AdminReply(ok=reply.ok, result={**self._summary(), **reply.result}, error=reply.error)
            await _respond(msg, reply)
            return
        assert isinstance(control, InstanceControl)
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
            "num_requests": len(self._publisher),
        }

    # -- status ---------------------------------------------------------------------------------------------

    def _on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        news = self._progress.update(outputs)
        if self.fudg_prefill is not None:
            outputs = self._hand_off(outputs, self.fudg_prefill)
        self._publisher.on_step(outputs, pending=stats.num_running + stats.num_waiting > 0)
        # Admissions, finishes, first tokens and phase changes are what the coordinator schedules on.
        shape = (stats.num_running, stats.num_waiting, phase_of(stats))
        if news or shape != self._reported_shape:
            self._reported_shape = shape
            self._reporter.poke()
        else:
            self._reporter.poke_progress()

    def _hand_off(self, outputs: list[RequestOutput], prefill: PrefillRole) -> list[RequestOutput]:
        """FuDG prefill: requests the engine handed out with their KV leave without a terminal chunk; the
        role streams their first token and ships them. The other outputs are published as usual."""
        kept: list[RequestOutput] = []
        for out in outputs:
            if out.kv_payload is None:
                kept.append(out)
            elif prefill.on_transferred(out):  # False: aborted meanwhile, the payload is dropped
                self._publisher.release(out.request_id)
        return kept

    def _on_engine_dead(self, error: EngineDeadError) -> None:
        self._publisher.fail_all(str(error))
        if self.engine.crashed:
            self._engine_died(str(error))

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
            prefill_window=self._window.open,
            window_epoch=self._window.epoch,
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

    # -- FudgHost (services/instance/fudg.py) ---------------------------------------------------------------

    @property
    def instance_id(self) -> str:
        return self.config.instance_id

    @property
    def prefix(self) -> str:
        return self.config.prefix

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "not started"
        return self._nc

    @property
    def accepting(self) -> bool:
        return self.state in ("starting", "ready")

    def to_unix(self, engine_time: float) -> float:
        return self._to_unix(engine_time)

    def from_unix(self, unix_time: float) -> float:
        return unix_time - self._unix_offset

    def adopt(self, request: DispatchRequest, builder: ChunkBuilder) -> None:
        """Hold a request another instance prefilled (FuDG); the caller imports it into the engine next."""
        self._publisher.open(request.request_id, request.reply_subject, builder)  # ValueError if held
        self._progress.add(request.request_id, len(request.prompt_token_ids), request.arrival_time)
        self._reporter.poke()

    def fail(self, request_id: str, message: str) -> None:
        if self._publisher.fail(request_id, message):
            self.engine.abort(request_id)


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
