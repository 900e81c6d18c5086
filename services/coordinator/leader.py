"""What the coordinator holding the macro instance's lease does: the instance registry (register,
heartbeats, deregister, lease expiry), taking submits (handed to the Dispatcher), and the state changes
admin commands ask for.

A `Leader` lives exactly as long as the lease is held: `start` subscribes, `stop` unsubscribes, and the
in-memory state dies with it (the next holder reloads Redis). NATS callbacks of one subscription run one
after another, so submits run in tasks of their own: a slow instance must not hold up other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from redis.exceptions import RedisError

from services.coordinator.dispatcher import Dispatcher
from services.coordinator.inflight import InflightTracker
from services.coordinator.instance_link import ask
from services.coordinator.registry import DEFAULT_MACRO_INSTANCE, AdminState, InstanceRecord, Registry
from services.coordinator.scheduling_config import SchedulingConfig
from services.coordinator.store import Snapshot, Store
from services.infra.nats_sync import synced
from shared import subjects
from shared.messages import (
    AdminReply,
    ClusterChanged,
    ControlCommand,
    DeregisterInstance,
    ErrorReply,
    InstanceControl,
    InstanceInfo,
    InstanceLost,
    InstanceStatus,
    RegisterAck,
    RegisterInstance,
    SubmitRequest,
    TokenChunk,
)
from shared.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.25  # seconds between instance lease checks
CONTROL_TIMEOUT = 2.0  # seconds an instance gets to answer an InstanceControl
REGISTER_PROMPT_INTERVAL = 1.0  # at most one "register again" per unknown instance per interval
LOST_CHUNK_SEQ = -1  # seq of the coordinator's terminal error chunk: never a real chunk's seq


class Leader:
    def __init__(
        self,
        *,
        nc: NATS,
        store: Store,
        prefix: str,
        coordinator_id: str,
        scheduling: SchedulingConfig,
        snapshot: Snapshot,
    ):
        self.nc = nc
        self.store = store
        self.prefix = prefix
        self.coordinator_id = coordinator_id
        self.registry = Registry(scheduling.lease_seconds)
        self.inflight = InflightTracker()
        self.dispatcher = Dispatcher(nc, self.registry, self.inflight, scheduling)
        now = time.monotonic()
        for stored in snapshot.instances:
            self.registry.restore(stored.info, stored.macro_instance_id, stored.state, now)
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._prompted: dict[str, float] = {}  # unknown instance → when it was last asked to register
        self._departed: dict[str, float] = {}  # deregistered instance → until when its reports are ignored
        self._lease_written: dict[str, float] = {}  # instance → when its Redis lease key was last refreshed

    @property
    def scheduling(self) -> SchedulingConfig:
        return self.dispatcher.scheduling

    # ---- lifecycle ----

    async def start(self) -> None:
        queue = subjects.COORDINATOR_QUEUE
        handlers = [
            (subjects.submit(self.prefix), queue, self._on_submit),
            (subjects.submit(self.prefix, DEFAULT_MACRO_INSTANCE), queue, self._on_submit),
            (subjects.register(self.prefix), queue, self._on_register),
            (subjects.deregister(self.prefix), queue, self._on_deregister),
            (subjects.status_all(self.prefix), "", self._on_status),
        ]
        for subject, group, callback in handlers:
            self._subscriptions.append(await self.nc.subscribe(subject, queue=group, cb=callback))
        await synced(self.nc)
        self._checker = asyncio.create_task(self._check_leases(), name="coordinator-lease-check")
        await self._cluster_changed("coordinator took over")

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
        # Requests already being dispatched get a moment to answer their routers.
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- submit → dispatch ----

    async def _on_submit(self, msg: Msg) -> None:
        self._spawn(self._submit(msg))

    async def _submit(self, msg: Msg) -> None:
        try:
            submit = decode(msg.data, SubmitRequest)
        except WireError as error:
            await _respond(msg, ErrorReply.from_wire_error(error))
            return
        macro = msg.subject.rsplit(".", 1)[1] if msg.subject != subjects.submit(self.prefix) else None
        try:
            reply = await self.dispatcher.dispatch(submit, macro or DEFAULT_MACRO_INSTANCE)
        except Exception:
            log.exception("dispatch of request %s failed", submit.request_id)
            reply = ErrorReply(code="internal", message="the coordinator failed to dispatch the request")
        await _respond(msg, reply)

    # ---- registration and heartbeats ----

    async def _on_register(self, msg: Msg) -> None:
        try:
            info = decode(msg.data, RegisterInstance).info
            _check_announced(info)
        except WireError as error:
            await _respond(msg, ErrorReply.from_wire_error(error))
            return
        except ValueError as error:
            await _respond(msg, self._register_ack(None, str(error)))
            return
        record, joined = self.registry.register(info, DEFAULT_MACRO_INSTANCE, time.monotonic())
        self._departed.pop(info.instance_id, None)
        self._prompted.pop(info.instance_id, None)
        try:
            await self.store.save_instance(info, record.macro_instance_id, record.state)
            await self._touch_lease(record, force=True)
        except RedisError as error:
            log.error("could not persist instance %s: %s", info.instance_id, error)
            if joined == "new":
                self.registry.remove(info.instance_id)
            await _respond(msg, ErrorReply(code="internal", message=f"coordinator storage failed: {error}"))
            return
        await _respond(msg, self._register_ack(record.macro_instance_id))
        log.info("instance %s registered (%s, %s)", info.instance_id, joined, record.state)
        if joined == "restarted":
            # The old process died with its requests; the new one never heard of them.
            await self._fail_requests(info.instance_id, "the instance restarted")
        if record.state == "draining":
            self._spawn(self._control_logged(info.instance_id, "drain"))
        await self._cluster_changed("instance registered", record.macro_instance_id)

    def _register_ack(self, macro_instance_id: str | None, message: str = "") -> RegisterAck:
        return RegisterAck(
            accepted=macro_instance_id is not None,
            macro_instance_id=macro_instance_id,
            lease_seconds=self.scheduling.lease_seconds,
            message=message,
        )

    async def _on_status(self, msg: Msg) -> None:
        try:
            status = decode(msg.data, InstanceStatus)
            if msg.subject != subjects.status(self.prefix, status.instance_id):
                raise ValueError(f"status of {status.instance_id!r} arrived on {msg.subject}")
        except (WireError, ValueError) as error:
            log.warning("dropped a status report on %s: %s", msg.subject, error)
            return
        now = time.monotonic()
        record = self.registry.heartbeat(status, now)
        if record is None:
            await self._unknown_reporter(status.instance_id, now)
            return
        self.inflight.observe(status)
        try:
            await self._touch_lease(record)
        except RedisError as error:
            log.warning("could not refresh the lease key of %s: %s", status.instance_id, error)

    async def _unknown_reporter(self, instance_id: str, now: float) -> None:
        """An instance reports but is not registered (this coordinator lost it): ask it to register."""
        if instance_id in self._departed:
            return
        if now - self._prompted.get(instance_id, -REGISTER_PROMPT_INTERVAL) < REGISTER_PROMPT_INTERVAL:
            return
        self._prompted[instance_id] = now
        log.info("status from unregistered instance %s: asking it to register", instance_id)
        self._spawn(self._control_logged(instance_id, "register"))

    async def _touch_lease(self, record: InstanceRecord, *, force: bool = False) -> None:
        # The Redis lease key is for readers (routers, tools); throttled so a status every step is cheap.
        now = time.monotonic()
        lease = self.scheduling.lease_seconds
        if force or now - self._lease_written.get(record.instance_id, -lease) >= lease / 3:
            self._lease_written[record.instance_id] = now
            await self.store.touch_instance_lease(record.instance_id, self.coordinator_id, lease)

    async def _on_deregister(self, msg: Msg) -> None:
        try:
            goodbye = decode(msg.data, DeregisterInstance)
        except WireError as error:
            log.warning("dropped a deregister message: %s", error)
            return
        if goodbye.instance_id not in self.registry:
            log.info("deregister from unknown instance %s ignored", goodbye.instance_id)
            return
        # A clean exit: the instance ended its own streams, so its requests are not failed here.
        self.inflight.take_instance(goodbye.instance_id)
        self._departed[goodbye.instance_id] = time.monotonic() + max(5.0, 2 * self.scheduling.lease_seconds)
        record = self.registry.remove(goodbye.instance_id)
        await self._forget([record])
        log.info("instance %s deregistered: %s", goodbye.instance_id, goodbye.reason)
        await self._cluster_changed("instance deregistered", record.macro_instance_id)

    # ---- leases ----

    async def _check_leases(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            try:
                await self.check_leases_once(time.monotonic())
            except Exception:
                log.exception("instance lease check failed")

    async def check_leases_once(self, now: float) -> None:
        expired = self.registry.expire(now)
        if expired:
            await self._forget(expired)
            reason = f"no status report for more than {self.scheduling.lease_seconds}s"
            for record in expired:
                log.warning("instance %s lost: %s", record.instance_id, reason)
                lost = InstanceLost(instance_id=record.instance_id, reason=reason, time=time.time())
                await self.nc.publish(subjects.instance_lost(self.prefix), encode(lost))
                await self._fail_requests(record.instance_id, f"instance {record.instance_id} lost: {reason}")
            await self._cluster_changed("instance lost", None)
        self.inflight.prune(now)
        for table, horizon in ((self._prompted, now - 60.0), (self._departed, now)):
            for instance_id in [i for i, t in table.items() if t < horizon]:
                del table[instance_id]

    async def _fail_requests(self, instance_id: str, error: str) -> None:
        """End the streams of the instance's unfinished requests with a terminal error chunk."""
        for entry in self.inflight.take_instance(instance_id):
            chunk = TokenChunk(
                request_id=entry.request_id,
                seq=LOST_CHUNK_SEQ,
                token_ids=[],
                finished=True,
                prompt_tokens=entry.prompt_tokens,
                completion_tokens=entry.output_tokens,
                finish_reason="error",
                error=error,
            )
            await self.nc.publish(entry.reply_subject, encode(chunk))

    async def _forget(self, records: list[InstanceRecord]) -> None:
        for record in records:
            self._lease_written.pop(record.instance_id, None)
        try:
            await self.store.delete_instances((r.instance_id, r.macro_instance_id) for r in records)
        except RedisError as error:
            # The next holder reloads them unconfirmed; they expire again there.
            log.error("could not delete instances from Redis: %s", error)

    # ---- operations behind admin commands ----

    async def set_state(self, instance_id: str, state: AdminState, command: ControlCommand) -> dict[str, Any]:
        """Mark the instance ready/draining (persisted), then tell it; returns what the instance said."""
        record = self.registry.set_state(instance_id, state)
        await self.store.save_state(instance_id, record.macro_instance_id, state)
        await self._cluster_changed(f"instance {state}", record.macro_instance_id)
        ok, error = await self.control(instance_id, command)
        return {
            "instance_id": instance_id,
            "state": state,
            "instance_acknowledged": ok,
            "instance_error": error,
        }

    async def update_config(self, updates: dict[str, Any]) -> SchedulingConfig:
        """Validate, persist and apply (ConfigError naming the bad key)."""
        config = self.scheduling.updated(updates)
        await self.store.save_config({k: v for k, v in config.to_text().items() if k in updates})
        self.dispatcher.configure(config)
        self.registry.lease_seconds = config.lease_seconds
        return config

    async def control(
        self, instance_id: str, command: ControlCommand, args: dict[str, Any] | None = None
    ) -> tuple[bool, str | None]:
        """Send an InstanceControl; (acknowledged, error)."""
        if instance_id in self.registry:
            subject = self.registry.get(instance_id).info.subjects.control
        else:
            subject = subjects.instance_control(self.prefix, instance_id)
        reply = await ask(
            self.nc, subject, InstanceControl(command=command, args=args or {}), CONTROL_TIMEOUT
        )
        if isinstance(reply, AdminReply):
            return reply.ok, reply.error
        if isinstance(reply, ErrorReply):
            return False, f"{reply.code}: {reply.message}"
        return False, reply if isinstance(reply, str) else f"answered a {type(reply).__name__}"

    async def _control_logged(self, instance_id: str, command: ControlCommand) -> None:
        ok, error = await self.control(instance_id, command)
        if not ok:
            log.warning("instance %s did not take %r: %s", instance_id, command, error)

    async def _cluster_changed(
        self, reason: str, macro_instance_id: str | None = DEFAULT_MACRO_INSTANCE
    ) -> None:
        changed = ClusterChanged(reason=reason, time=time.time(), macro_instance_id=macro_instance_id)
        await self.nc.publish(subjects.cluster_changed(self.prefix), encode(changed))


def _check_announced(info: InstanceInfo) -> None:
    """ValueError unless the id and subjects are usable: the coordinator publishes to these subjects, and a
    wildcard or space in one would misroute requests or get the connection closed by the server."""
    subjects.check_id("instance_id", info.instance_id)
    for name in ("requests", "abort", "control"):
        try:
            subjects.check_prefix(getattr(info.subjects, name))
        except ValueError as error:
            raise ValueError(f"info.subjects.{name}: {error}") from None


async def _respond(msg: Msg, reply: Message) -> None:
    if not msg.reply:
        log.warning("request on %s has no reply subject; answer dropped", msg.subject)
        return
    try:
        await msg.respond(encode(reply))
    except NatsError as error:
        log.warning("could not answer on %s: %s", msg.subject, error)
