"""What the coordinator holding the macro instance's lease does: the instance registry (register,
heartbeats, deregister, lease expiry), taking submits (handed to the PaDG dispatch while `dispatch_policy` is
`padg`, to the FuDG pair dispatch under `fudg`, to the least-loaded Dispatcher otherwise), and the state
changes admin commands ask for.

A `Leader` lives exactly as long as the lease is held: `start` subscribes, `stop` unsubscribes, and the
in-memory state dies with it (the next holder reloads Redis). NATS callbacks of one subscription run one
after another, so submits run in tasks of their own: a slow instance must not hold up other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from redis.exceptions import RedisError

from services.coordinator.dispatcher import Dispatcher
from services.coordinator.fudg_dispatcher import dispatch_fudg
from services.coordinator.inflight import InflightTracker
from services.coordinator.instance_link import ask
from services.coordinator.padg_dispatcher import PadgDispatch, PadgHooks, Rerouted
from services.coordinator.registry import DEFAULT_MACRO_INSTANCE, AdminState, InstanceRecord, Registry
from services.coordinator.scaling_ops import build_scaling, ready_members
from services.coordinator.scaling_settings import BOUND_KEYS, ScalingSettings
from services.coordinator.scheduling_config import SchedulingConfig
from services.coordinator.store import Snapshot, Store, StoredWindow
from services.infra.nats_sync import synced
from shared import subjects
from shared.kv_messages import KvHandoffSkipped, KvTransferReport
from shared.messages import (
    AbortRequest,
    AdminReply,
    ClusterChanged,
    ControlCommand,
    DeregisterInstance,
    ErrorReply,
    InstanceControl,
    InstanceInfo,
    InstanceLost,
    InstanceStatus,
    PrefillWindow,
    RegisterAck,
    RegisterInstance,
    SubmitAck,
    SubmitRequest,
    TokenChunk,
)
from shared.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.25  # seconds between instance lease checks
SCALING_INTERVAL = 0.25  # seconds between mitosis ticks (finished drains, repairs, signals)
CONTROL_TIMEOUT = 2.0  # seconds an instance gets to answer an InstanceControl
REGISTER_PROMPT_INTERVAL = 1.0  # at most one "register again" per unknown instance per interval
LOST_CHUNK_SEQ = -1  # seq of the coordinator's terminal error chunk: never a real chunk's seq
STRAY_WINDOW_INTERVAL = 1.0  # seconds between two "open your window" orders to one instance outside PaDG


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
        scaling_settings: ScalingSettings | None = None,
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
        # instance → when its Redis lease key was last written (monotonic), and the state written
        self._lease_written: dict[str, tuple[float, str | None]] = {}
        self._stray_opened: dict[str, float] = {}  # instance → when it was last told to open (least_loaded)
        # Listeners of PaDG status deltas and activations (mitosis); they outlive policy switches.
        self.hooks = PadgHooks()
        # The overall scheduler (mitosis sets it): the macro instance for a submit that names none.
        self.choose_macro: Callable[[], str | None] | None = None
        self.padg: PadgDispatch | None = None
        if scheduling.dispatch_policy == "padg":
            self.padg = self._new_padg(scheduling, snapshot.windows)
        # Mitosis scaling: membership from the registry just restored; it listens to self.hooks.
        self.scaling = build_scaling(self, scaling_settings or ScalingSettings())
        self.scaling.paused = scheduling.dispatch_policy == "fudg"
        self._scaler: asyncio.Task[None] | None = None

    @property
    def scheduling(self) -> SchedulingConfig:
        return self.dispatcher.scheduling

    def _new_padg(self, scheduling: SchedulingConfig, windows: dict[str, StoredWindow]) -> PadgDispatch:
        return PadgDispatch(
            nc=self.nc,
            store=self.store,
            registry=self.registry,
            sender=self.dispatcher,
            scheduling=scheduling,
            windows=windows,
            hooks=self.hooks,
        )

    # ---- lifecycle ----

    async def start(self) -> None:
        queue = subjects.COORDINATOR_QUEUE
        handlers = [
            (subjects.submit(self.prefix), queue, self._on_submit),
            (subjects.submit_all(self.prefix), queue, self._on_submit),  # a submit naming its macro instance
            (subjects.register(self.prefix), queue, self._on_register),
            (subjects.deregister(self.prefix), queue, self._on_deregister),
            (subjects.status_all(self.prefix), "", self._on_status),
            (subjects.kv_transfers(self.prefix), "", self._on_transfer),  # FuDG in-flight bookkeeping
        ]
        for subject, group, callback in handlers:
            self._subscriptions.append(await self.nc.subscribe(subject, queue=group, cb=callback))
        await synced(self.nc)
        self._checker = asyncio.create_task(self._check_leases(), name="coordinator-lease-check")
        self._scaler = asyncio.create_task(self._scale(), name="coordinator-scaling")
        await self._cluster_changed("coordinator took over")

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        for task in (self._checker, self._scaler):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.padg is not None:
            await self.padg.stop()
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
            if macro is None and self.choose_macro is not None:
                macro = self.choose_macro()
            # The overall scheduler picks the macro instance (none ready: the default one, which says so).
            chosen = macro or self.scaling.choose_macro(ready_members(self.registry))
            reply = await self._dispatch(submit, chosen or DEFAULT_MACRO_INSTANCE)
        except Exception:
            log.exception("dispatch of request %s failed", submit.request_id)
            reply = ErrorReply(code="internal", message="the coordinator failed to dispatch the request")
        await _respond(msg, reply)

    async def _dispatch(self, submit: SubmitRequest, macro_instance_id: str) -> SubmitAck | ErrorReply:
        padg = self.padg
        if padg is not None:
            try:
                return await padg.dispatch(submit, macro_instance_id)
            except Rerouted:
                pass  # the policy changed while the request waited for a window
        if self.scheduling.dispatch_policy == "fudg":
            return await dispatch_fudg(self.dispatcher, submit)  # pairs across macro instances
        return await self.dispatcher.dispatch(submit, macro_instance_id)

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
        # A new instance goes where mitosis says (a macro instance or the pool); a known one keeps its place.
        known = info.instance_id in self.registry
        macro = DEFAULT_MACRO_INSTANCE if known else self.scaling.admit(info.instance_id)
        record, joined = self.registry.register(info, macro, time.monotonic())
        self._departed.pop(info.instance_id, None)
        self._prompted.pop(info.instance_id, None)
        try:
            await self.store.save_instance(info, record.macro_instance_id, record.state)
            await self._touch_lease(record, force=True)
        except RedisError as error:
            log.error("could not persist instance %s: %s", info.instance_id, error)
            if joined == "new":
                self.registry.remove(info.instance_id)
                await self.scaling.lost(info.instance_id, "its registration could not be stored")
            await _respond(msg, ErrorReply(code="internal", message=f"coordinator storage failed: {error}"))
            return
        if self.padg is not None:
            if joined == "restarted":
                self.padg.leave(info.instance_id)  # its windows and requests died with the old process
            self.padg.sync(record)
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
        self.inflight.observe(status, now)
        if self.padg is not None:
            try:
                self.padg.observe(status, record)
            except Exception:  # one odd report must not stop the status loop (or the lease refresh below)
                log.exception("PaDG could not apply the status of %s", status.instance_id)
        elif status.prefill_window is False:
            self._open_stray_window(record, status, now)
        try:
            await self._touch_lease(record, status)
        except RedisError as error:
            log.warning("could not refresh the lease key of %s: %s", status.instance_id, error)

    async def _on_transfer(self, msg: Msg) -> None:
        try:
            report = decode(msg.data, (KvTransferReport, KvHandoffSkipped))
        except WireError as error:
            log.warning("dropped a KV transfer report: %s", error)
            return
        # A skipped hand-off is as final as a refused one: the decode instance will not get the request.
        accepted = isinstance(report, KvTransferReport) and report.accepted
        self.inflight.transfer_done(report.request_id, report.decode_instance_id, accepted)

    def _open_stray_window(self, record: InstanceRecord, status: InstanceStatus, now: float) -> None:
        """Outside PaDG nobody rolls windows, so a padg-policy instance with its window closed would hold its
        prompts for ever: open it (above its own epoch; PaDG continues above that when it comes back)."""
        if now - self._stray_opened.get(record.instance_id, -STRAY_WINDOW_INTERVAL) < STRAY_WINDOW_INTERVAL:
            return
        self._stray_opened[record.instance_id] = now
        order = PrefillWindow(
            active=True, epoch=status.window_epoch + 1, time=time.time(), ttft_slo=self.scheduling.ttft_slo
        )
        log.info(
            "instance %s has its prefill window closed under %s: opening it",
            record.instance_id,
            self.scheduling.dispatch_policy,
        )
        self._spawn(self._window_logged(record, order))

    async def _window_logged(self, record: InstanceRecord, order: PrefillWindow) -> None:
        reply = await ask(self.nc, record.info.subjects.control, order, CONTROL_TIMEOUT)
        if not (isinstance(reply, AdminReply) and reply.ok):
            log.warning("instance %s did not open its window: %s", record.instance_id, reply)

    async def _unknown_reporter(self, instance_id: str, now: float) -> None:
        """An instance reports but is not registered (this coordinator lost it): ask it to register."""
        if instance_id in self._departed:
            return
        if now - self._prompted.get(instance_id, -REGISTER_PROMPT_INTERVAL) < REGISTER_PROMPT_INTERVAL:
            return
        self._prompted[instance_id] = now
        log.info("status from unregistered instance %s: asking it to register", instance_id)
        self._spawn(self._control_logged(instance_id, "register"))

    async def _touch_lease(
        self, record: InstanceRecord, status: InstanceStatus | None = None, *, force: bool = False
    ) -> None:
        """The Redis lease key, for readers (routers' /health and cluster gauges, tools): its value is the
        instance's latest status (its state name before the first report). Throttled to every lease/3 s so
        a status every step stays cheap, but a change of state is written at once."""
        now = time.monotonic()
        lease = self.scheduling.lease_seconds
        state = status.state if status is not None else record.state
        written_at, written_state = self._lease_written.get(record.instance_id, (-lease, None))
        if force or state != written_state or now - written_at >= lease / 3:
            # Before the first status the state is not recorded, so the first report is written at once.
            self._lease_written[record.instance_id] = (now, state if status is not None else None)
            value = encode(status) if status is not None else state.encode()
            await self.store.touch_instance_lease(record.instance_id, value, lease)

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
        await self.scaling.lost(goodbye.instance_id, f"deregistered: {goodbye.reason}")
        if self.padg is not None:
            self.padg.leave(goodbye.instance_id)
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
            if self.padg is not None:
                for record in expired:
                    self.padg.leave(record.instance_id)
            await self._forget(expired)
            reason = f"no status report for more than {self.scheduling.lease_seconds}s"
            for record in expired:
                log.warning("instance %s lost: %s", record.instance_id, reason)
                await self.scaling.lost(record.instance_id, reason)
                lost = InstanceLost(instance_id=record.instance_id, reason=reason, time=time.time())
                await self.nc.publish(subjects.instance_lost(self.prefix), encode(lost))
                await self._fail_requests(record.instance_id, f"instance {record.instance_id} lost: {reason}")
            await self._cluster_changed("instance lost", None)
        self.inflight.prune(now)
        for table, horizon in ((self._prompted, now - 60.0), (self._departed, now)):
            for instance_id in [i for i, t in table.items() if t < horizon]:
                del table[instance_id]

    async def _scale(self) -> None:
        while True:
            await asyncio.sleep(SCALING_INTERVAL)
            try:
                await self.scaling.tick(time.monotonic())
            except Exception:
                log.exception("mitosis scaling tick failed")

    async def _fail_requests(self, instance_id: str, error: str) -> None:
        """End the streams of the instance's unfinished requests with a terminal error chunk; a FuDG request's
        other instance is told to abort it (its KV would otherwise be decoded for nobody). That includes the
        requests a lost prefill instance had already handed off: their routers followed them through it, so
        its InstanceLost ended their streams."""
        for entry in self.inflight.take_instance(instance_id):
            if entry.partner is not None and entry.partner in self.registry:
                abort = AbortRequest(request_ids=[entry.request_id], reason=error)
                await self.nc.publish(self.registry.get(entry.partner).info.subjects.abort, encode(abort))
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
        for entry in self.inflight.take_partnered(instance_id):
            if entry.instance_id in self.registry:
                abort = AbortRequest(request_ids=[entry.request_id], reason=error)
                await self.nc.publish(self.registry.get(entry.instance_id).info.subjects.abort, encode(abort))

    async def _forget(self, records: list[InstanceRecord]) -> None:
        for record in records:
            self._lease_written.pop(record.instance_id, None)
            self._stray_opened.pop(record.instance_id, None)
        try:
            await self.store.delete_instances((r.instance_id, r.macro_instance_id) for r in records)
        except RedisError as error:
            # The next holder reloads them unconfirmed; they expire again there.
            log.error("could not delete instances from Redis: %s", error)

    # ---- operations behind admin commands ----

    async def set_state(self, instance_id: str, state: AdminState, command: ControlCommand) -> dict[str, Any]:
        """Mark the instance ready/draining (persisted), then tell it; returns what the instance said."""
        record = self.registry.set_state(instance_id, state)
        if self.padg is not None:
            self.padg.sync(record)
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
        windows = None
        if config.dispatch_policy == "padg" and self.padg is None:
            # Read before anything changes: PaDG continues above the epochs it persisted last time.
            windows = {m: await self.store.load_window(m) for m in self.registry.macro_instances()}
        await self.store.save_config({k: v for k, v in config.to_text().items() if k in updates})
        before = self.scheduling.dispatch_policy
        self.dispatcher.configure(config)
        self.registry.lease_seconds = config.lease_seconds
        self.scaling.paused = config.dispatch_policy == "fudg"
        if windows is not None:
            self.padg = self._new_padg(config, windows)
            log.info("dispatch policy %s -> padg", before)
        elif config.dispatch_policy != "padg" and self.padg is not None:
            padg, self.padg = self.padg, None
            await padg.open_all()
            await padg.stop(reroute=True)
            log.info("dispatch policy padg -> %s: every prefill window opened", config.dispatch_policy)
        elif self.padg is not None:
            self.padg.configure(config)
        if BOUND_KEYS & updates.keys():
            bounds = {"n_lower": config.n_lower, "n_upper": config.n_upper, "ttft_slo": config.ttft_slo}
            await self.scaling.set_bounds(time.monotonic(), **bounds)
        return config

    async def move_instance(self, instance_id: str, macro_instance_id: str) -> InstanceRecord:
        """Move a member to another macro instance (mitosis: only control moves, the instance keeps its
        requests and KV). Persisted, then the PaDG state follows: the instance leaves the old rolling cycle
        (the next in line takes over if it was the prefill instance) and joins the end of the new one with
        its last report."""
        record = self.registry.get(instance_id)
        source = record.macro_instance_id
        if source == macro_instance_id:
            return record
        subjects.check_id("macro_instance_id", macro_instance_id)
        await self.store.move_instance(instance_id, source, macro_instance_id, record.state)
        record = self.registry.move(instance_id, macro_instance_id)
        if self.padg is not None:
            self.padg.leave(instance_id)
            self.padg.sync(record)
        await self._cluster_changed(f"instance moved from {source}", macro_instance_id)
        return record

    def ttft_budget_left(self, macro_instance_id: str) -> float | None:
        """Seconds of prefill the macro instance's open window can still admit (None outside PaDG)."""
        return None if self.padg is None else self.padg.ttft_budget_left(macro_instance_id)

    def macro_summary(self, macro_instance_id: str) -> dict[str, Any]:
        """The dispatch state of one macro instance, for `ecoserve admin status`."""
        if self.padg is None:
            return {"policy": self.scheduling.dispatch_policy}
        return self.padg.summary(macro_instance_id)

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
