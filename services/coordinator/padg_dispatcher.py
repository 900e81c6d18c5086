"""PaDG dispatch in the running coordinator: the async glue around the pure `MacroInstanceDispatcher` (one per
macro instance), used by the leader while `dispatch_policy` is `padg`.

- Membership mirrors the registry (join on register, leave on deregister / lease expiry / move, readiness
  from the admin state and confirmation). An instance without a usable prefill profile cannot be priced, so
  it is kept out of PaDG (it stays registered; `summary()["excluded"]` and the log say why): guessing a
  prefill time would make the TTFT budget meaningless, and the padg instance policy profiles at start.
- Submits: `decide` → `Assign` is sent with the shared `Dispatcher.send` (registry and in-flight
  bookkeeping); an instance that does not take it is cancelled, suspended until its next report, and the
  dispatcher asked again (up to MAX_DISPATCH_ATTEMPTS). `Pending` (paper variant) waits in the macro
  instance's FIFO, retried oldest first after every member report, up to `pending_timeout` (then 429).
- Activations bump the macro instance's window epoch, persist it (Redis, so epochs keep growing across
  coordinators), then order the new instance open and the previous one closed, off the request's path.
  Reports that disagree with the intent get the order again (padg_windows.py), which also restores the
  windows after a coordinator takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from redis.exceptions import RedisError

from services.coordinator.dispatch import Unavailable
from services.coordinator.dispatcher import MAX_DISPATCH_ATTEMPTS, RETRY_AFTER, Dispatcher
from services.coordinator.instance_link import ask
from services.coordinator.padg import (
    Activation,
    Assign,
    MacroInstanceDispatcher,
    PadgConfig,
    PadgDecision,
    PadgRequest,
    Pending,
)
from services.coordinator.padg_views import StatusDelta
from services.coordinator.padg_windows import WindowBook, WindowOrder
from services.coordinator.prefill_model import PrefillModel, ProfileError
from services.coordinator.registry import InstanceRecord, Registry
from services.coordinator.scaling import SPARE_POOL
from services.coordinator.scheduling_config import SchedulingConfig
from services.coordinator.store import Store, StoredWindow
from shared.messages import AdminReply, ErrorReply, InstanceStatus, PrefillWindow, SubmitAck, SubmitRequest
from shared.prefill_profile import PrefillProfile

log = logging.getLogger(__name__)

WINDOW_TIMEOUT = 2.0  # seconds an instance gets to answer a PrefillWindow (never awaited by a submit)

StatusDeltaHook = Callable[[str, str, StatusDelta], None]  # (macro, instance, delta)
ActivationHook = Callable[[str, Activation, int], None]  # (macro, activation, epoch)


@dataclass
class PadgHooks:
    """Listeners the leader's other parts (mitosis) register; called synchronously, must not block."""

    status_delta: list[StatusDeltaHook] = field(default_factory=list)
    activation: list[ActivationHook] = field(default_factory=list)


class Rerouted(Exception):
    """The dispatch policy changed while the request waited: dispatch it with the current policy."""


@dataclass
class _Waiter:
    request: PadgRequest
    future: asyncio.Future[PadgDecision]


@dataclass
class _Macro:
    dispatcher: MacroInstanceDispatcher
    book: WindowBook
    pending: deque[_Waiter] = field(default_factory=deque)
    # Held while an activation is persisted and its orders published, so activations reach the instances
    # in epoch order: an open overtaken by the next close would be ignored as stale, and the prompts the
    # window admitted would wait for the instance's next window.
    orders: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_pending: Pending | None = None  # why the oldest waiting request could not be placed (admin)


def padg_config(scheduling: SchedulingConfig) -> PadgConfig:
    return PadgConfig(
        ttft_slo=scheduling.ttft_slo,
        tpot_slo=scheduling.tpot_slo,
        variant=scheduling.padg_variant,  # type: ignore[arg-type]
    )


def prefill_model(record: InstanceRecord, rule: str) -> PrefillModel:
    """The instance's prefill-time model; ProfileError says why there is none."""
    if record.info.role != "mixed":  # it hands requests on (or takes them over): PaDG must leave it alone
        raise ProfileError(f"instance {record.instance_id} has the FuDG {record.info.role} role")
    raw = record.info.prefill_profile
    if raw is None:
        raise ProfileError(
            f"instance {record.instance_id} announced no prefill profile (policy {record.info.policy!r}; "
            "instances profile at start under the padg policy)"
        )
    try:
        profile = PrefillProfile.from_dict(raw)
    except ValueError as error:
        raise ProfileError(f"instance {record.instance_id}: malformed prefill profile: {error}") from None
    try:
        return PrefillModel(profile.points, rule)  # type: ignore[arg-type]
    except ProfileError as error:
        raise ProfileError(f"instance {record.instance_id}: prefill profile unusable: {error}") from None


class PadgDispatch:
    def __init__(
        self,
        *,
        nc: NATS,
        store: Store,
        registry: Registry,
        sender: Dispatcher,
        scheduling: SchedulingConfig,
        windows: dict[str, StoredWindow],
        hooks: PadgHooks | None = None,
    ):
        self.nc = nc
        self.store = store
        self.registry = registry
        self.sender = sender
        self.scheduling = scheduling
        self.hooks = hooks or PadgHooks()
        self._macros: dict[str, _Macro] = {}
        self._where: dict[str, str] = {}  # member → its macro instance
        self.excluded: dict[str, str] = {}  # registered instance → why PaDG cannot use it
        self._excluded_info: dict[str, Any] = {}  # the InstanceInfo that was judged
        self._suspended: set[str] = set()  # refused a dispatch; not eligible until its next report
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stored = dict(windows)
        for record in registry:
            self.sync(record)
        for macro_id, stored in windows.items():
            self._restore(macro_id, stored)

    # ---- lifecycle ----

    async def stop(self, *, reroute: bool = False) -> None:
        """Drop the PaDG state: waiting requests are rerouted to the new policy (`reroute`) or refused (the
        coordinator steps down); window orders in flight get a moment to finish."""
        for macro in self._macros.values():
            while macro.pending:
                waiter = macro.pending.popleft()
                if waiter.future.done():
                    continue
                if reroute:
                    waiter.future.set_exception(Rerouted())
                else:
                    waiter.future.set_result(Unavailable("the coordinator is stepping down", RETRY_AFTER))
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def open_all(self) -> None:
        """Leaving PaDG: open every member's window (a padg-policy instance then prefills whatever it gets,
        like nodg) under a new epoch, and persist that nothing is active."""
        sends = []
        for macro_id, macro in self._macros.items():
            book = macro.book
            book.epoch += 1
            book.deactivated()
            await self._persist(macro_id, book.epoch, None, 0.0, opened=False)
            sends += [self._send_window(WindowOrder(i, True, book.epoch)) for i in macro.dispatcher.members]
        await asyncio.gather(*sends)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- membership ----

    def sync(self, record: InstanceRecord) -> None:
        """Bring one registered instance's PaDG membership and readiness in line with the registry."""
        instance_id = record.instance_id
        macro_id = record.macro_instance_id
        if macro_id == SPARE_POOL:
            self.leave(instance_id)  # the spare pool is no macro instance: nothing is dispatched there
            return
        if self._where.get(instance_id) not in (None, macro_id):
            self.leave(instance_id)  # moved to another macro instance
        if instance_id not in self._where:
            if self._excluded_info.get(instance_id) is record.info:
                return  # already judged unusable; a new registration brings a new info
            try:
                model = prefill_model(record, self.scheduling.prefill_rule)
            except ProfileError as error:
                if self.excluded.get(instance_id) != str(error):
                    log.warning("PaDG cannot use instance %s: %s", instance_id, error)
                self.excluded[instance_id] = str(error)
                self._excluded_info[instance_id] = record.info
                return
            self.excluded.pop(instance_id, None)
            self._excluded_info.pop(instance_id, None)
            macro = self._macro(macro_id)
            macro.dispatcher.join(
                instance_id,
                block_size=record.info.block_size,
                kv_blocks_total=record.info.kv_blocks_total,
                prefill_model=model,
                status=record.status,
                ready=False,
            )
            self._where[instance_id] = macro_id
        ready = record.state == "ready" and record.confirmed and instance_id not in self._suspended
        self._macros[macro_id].dispatcher.set_ready(instance_id, ready)

    def leave(self, instance_id: str) -> None:
        """The instance is gone (deregistered, lost, restarted, moved)."""
        self.excluded.pop(instance_id, None)
        self._excluded_info.pop(instance_id, None)
        self._suspended.discard(instance_id)
        macro_id = self._where.pop(instance_id, None)
        if macro_id is None:
            return
        macro = self._macros[macro_id]
        macro.dispatcher.leave(instance_id)
        macro.book.forget(instance_id)
        if macro.book.active == instance_id:
            macro.book.deactivated()
        if not macro.dispatcher.members and not macro.pending:
            # Keep the epoch: a member joining later continues from it.
            self._stored[macro_id] = StoredWindow(epoch=macro.book.epoch, opened=macro.book.opened)
            del self._macros[macro_id]
        else:
            self._drain(macro_id, macro)

    def _macro(self, macro_id: str) -> _Macro:
        macro = self._macros.get(macro_id)
        if macro is None:
            stored = self._stored.pop(macro_id, StoredWindow())
            book = WindowBook(epoch=stored.epoch, opened=dict(stored.opened))
            macro = self._macros[macro_id] = _Macro(
                MacroInstanceDispatcher(padg_config(self.scheduling)), book
            )
        return macro

    def _restore(self, macro_id: str, stored: StoredWindow) -> None:
        """Resume the persisted activation of a macro instance (coordinator takeover, policy switch)."""
        macro = self._macros.get(macro_id)
        if macro is None:
            return
        macro.book.epoch = max(macro.book.epoch, stored.epoch)
        macro.book.opened.update(stored.opened)
        active = stored.active
        if active is None or self._where.get(active) != macro_id or stored.opened_at is None:
            return
        macro.dispatcher.restore_activation(active, stored.opened_at)
        macro.book.opened_at = stored.opened_at
        macro.book.restored(active)
        log.info("PaDG %s: resumed activation of %s at epoch %d", macro_id, active, macro.book.epoch)

    def configure(self, scheduling: SchedulingConfig) -> None:
        """Apply new SLOs, variant or prefill rule (pending requests are re-checked under them)."""
        rule_changed = scheduling.prefill_rule != self.scheduling.prefill_rule
        self.scheduling = scheduling
        for macro in self._macros.values():
            macro.dispatcher.config = padg_config(scheduling)
        if rule_changed:
            for record in list(self.registry):
                if record.instance_id in self._where:
                    try:
                        view = self._macros[self._where[record.instance_id]].dispatcher.view(
                            record.instance_id
                        )
                        view.prefill_model = prefill_model(record, scheduling.prefill_rule)
                        continue
                    except ProfileError:
                        self.leave(record.instance_id)
                self._excluded_info.pop(record.instance_id, None)
                self.sync(record)
        for macro_id, macro in list(self._macros.items()):
            self._drain(macro_id, macro)

    # ---- status reports ----

    def observe(self, status: InstanceStatus, record: InstanceRecord) -> None:
        """A registered instance reported."""
        self._suspended.discard(status.instance_id)
        self.sync(record)
        macro_id = self._where.get(status.instance_id)
        if macro_id is None:
            return
        macro = self._macros[macro_id]
        delta = macro.dispatcher.observe(status)
        if delta is not None and (delta.finished or delta.ttfts):
            for hook in self.hooks.status_delta:
                _call(hook, macro_id, status.instance_id, delta)
        book = macro.book
        if book.adopt(status):
            log.warning(
                "PaDG %s: %s applied epoch %d; continuing from it", macro_id, status.instance_id, book.epoch
            )
            self._spawn(self._persist(macro_id, book.epoch, book.active, book.opened_at, opened=False))
        order = book.correction(status, time.time())
        if order is not None:
            log.info(
                "PaDG %s: %s reports its window %s at epoch %d: sending %s",
                macro_id,
                status.instance_id,
                "open" if status.prefill_window else "closed",
                status.window_epoch,
                order,
            )
            self._spawn(self._send_window(order))
        self._drain(macro_id, macro)

    # ---- dispatch ----

    async def dispatch(self, submit: SubmitRequest, macro_id: str) -> SubmitAck | ErrorReply:
        """Raises Rerouted when the policy changed while the request waited for a window."""
        request = PadgRequest(
            request_id=submit.request_id,
            prompt_tokens=max(1, len(submit.prompt_token_ids)),  # an empty prompt is the instance's to refuse
            arrival_time=submit.arrival_time,
        )
        failures: list[str] = []
        for _ in range(MAX_DISPATCH_ATTEMPTS):
            decision = await self._decide(macro_id, request)
            if isinstance(decision, Assign) and decision.instance_id not in self.registry:
                failures.append(f"instance {decision.instance_id} left")  # while the request waited
                continue
            if isinstance(decision, ErrorReply):
                if failures:
                    decision = ErrorReply(
                        code=decision.code,
                        message="; ".join([decision.message, *failures]),
                        retry_after=decision.retry_after,
                    )
                return decision
            outcome = await self.sender.send(submit, decision.instance_id)
            if not isinstance(outcome, str):
                return outcome
            failures.append(outcome)
            self._refused(decision.instance_id, request.request_id)
        return ErrorReply(code="unavailable", message="; ".join(failures), retry_after=RETRY_AFTER)

    async def _decide(self, macro_id: str, request: PadgRequest) -> Assign | ErrorReply:
        macro = self._macros.get(macro_id)
        if macro is None:
            return self._unavailable(macro_id, "no instance that PaDG can use")
        self._drain(macro_id, macro)  # the requests waiting already go first
        decision: PadgDecision | None = None
        if not macro.pending:
            decision = macro.dispatcher.decide(request, time.time())
            if isinstance(decision, Assign):
                self._activated(macro_id, macro, decision)
        if decision is None or isinstance(decision, Pending):
            macro.last_pending = decision or macro.last_pending
            decision = await self._wait(macro_id, macro, request, decision)  # activated by `_drain`
        if isinstance(decision, Unavailable):
            return self._unavailable(macro_id, decision.message, decision.retry_after)
        if isinstance(decision, Pending):
            return ErrorReply(
                code="overloaded",
                message=f"no prefill window could take the request within {self.scheduling.pending_timeout}s "
                f"({decision.message})",
                retry_after=RETRY_AFTER,
            )
        return decision

    async def _wait(
        self, macro_id: str, macro: _Macro, request: PadgRequest, last: Pending | None
    ) -> PadgDecision:
        """Queue behind the waiting requests until a report lets the dispatcher place this one."""
        waiter = _Waiter(request, asyncio.get_running_loop().create_future())
        macro.pending.append(waiter)
        log.debug(
            "PaDG %s: request %s pending (%s)",
            macro_id,
            request.request_id,
            last.message if last else "queue",
        )
        try:
            await asyncio.wait({waiter.future}, timeout=self.scheduling.pending_timeout)
        except (
            BaseException
        ):  # the task was cancelled (the coordinator steps down): nothing may stay admitted
            self._abandon(macro, waiter)
            raise
        if not waiter.future.done():  # timed out
            self._abandon(macro, waiter)
            return last or Pending("still queued behind older requests", ())
        return waiter.future.result()  # raises Rerouted

    @staticmethod
    def _abandon(macro: _Macro, waiter: _Waiter) -> None:
        """Nobody waits for this request any more: out of the queue, and out of the window if placed."""
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            decision = future.result()
            if isinstance(decision, Assign):
                macro.dispatcher.cancel(decision.instance_id, waiter.request.request_id)
        if waiter in macro.pending:
            macro.pending.remove(waiter)

    def _drain(self, macro_id: str, macro: _Macro) -> None:
        """Place waiting requests, oldest first, while the dispatcher can (FIFO: none overtakes another)."""
        now = time.time()
        while macro.pending:
            waiter = macro.pending[0]
            if waiter.future.done():
                macro.pending.popleft()
                continue
            decision = macro.dispatcher.decide(waiter.request, now)
            if isinstance(decision, Pending):
                macro.last_pending = decision
                return
            macro.last_pending = None
            macro.pending.popleft()
            if isinstance(decision, Assign):
                self._activated(macro_id, macro, decision)  # now, in the order the dispatcher committed
            waiter.future.set_result(decision)

    def _activated(self, macro_id: str, macro: _Macro, assign: Assign) -> None:
        activation = assign.activation
        if activation is None:
            return
        orders = macro.book.activate(activation.activate, activation.deactivate, time.time())
        epoch = macro.book.epoch
        log.info(
            "PaDG %s: epoch %d: prefill window %s -> %s (%s)",
            macro_id,
            epoch,
            activation.deactivate,
            activation.activate,
            assign.reason,
        )
        for hook in self.hooks.activation:
            _call(hook, macro_id, activation, epoch)
        self._spawn(self._apply(macro_id, macro, epoch, activation.activate, time.time(), orders))

    def _refused(self, instance_id: str, request_id: str) -> None:
        macro_id = self._where.get(instance_id)
        if macro_id is None:
            return
        self._macros[macro_id].dispatcher.cancel(instance_id, request_id)
        self._suspended.add(instance_id)
        if instance_id in self.registry:
            self.sync(self.registry.get(instance_id))

    def _unavailable(self, macro_id: str, message: str, retry_after: float = RETRY_AFTER) -> ErrorReply:
        excluded = [f"{i}: {reason}" for i, reason in self.excluded.items() if self._macro_of(i) == macro_id]
        return ErrorReply(
            code="unavailable",
            message="; ".join([f"PaDG {macro_id}: {message}", *excluded]),
            retry_after=retry_after,
        )

    def _macro_of(self, instance_id: str) -> str | None:
        return self.registry.get(instance_id).macro_instance_id if instance_id in self.registry else None

    # ---- window orders ----

    async def _apply(
        self,
        macro_id: str,
        macro: _Macro,
        epoch: int,
        active: str,
        opened_at: float,
        orders: Iterable[WindowOrder],
    ) -> None:
        # Tasks take the lock in the order they were spawned, i.e. in epoch order.
        async with macro.orders:
            # Persisted before anyone is told: a successor coordinator must never reuse this epoch.
            await self._persist(macro_id, epoch, active, opened_at, opened=True)
            for order in orders:
                self._spawn(self._send_window(order))
            await asyncio.sleep(0)  # the sends publish now (replies are awaited outside the lock)

    async def _persist(
        self, macro_id: str, epoch: int, active: str | None, opened_at: float | None, *, opened: bool
    ) -> None:
        try:
            await self.store.save_window(
                macro_id, epoch=epoch, active=active, opened_at=opened_at or 0.0, opened=opened
            )
        except RedisError as error:
            # The orders still go out: instances report their epoch, and a successor continues above it.
            log.error("PaDG %s: could not persist window epoch %d: %s", macro_id, epoch, error)

    async def _send_window(self, order: WindowOrder) -> None:
        if order.instance_id not in self.registry:
            return
        info = self.registry.get(order.instance_id).info
        subject = info.subjects.control
        message = PrefillWindow(
            active=order.open,
            epoch=order.epoch,
            time=time.time(),
            ttft_slo=self.scheduling.ttft_slo,
            hold_outputs=self.scheduling.hold_outputs,
        )
        reply = await ask(self.nc, subject, message, WINDOW_TIMEOUT)
        if not (isinstance(reply, AdminReply) and reply.ok):
            problem = reply.error if isinstance(reply, AdminReply) else getattr(reply, "message", reply)
            # Its next report shows the window in the wrong state, and the order goes again. An instance of
            # another policy (profiled with --profile-prefill on) has no window: it prefills at any time.
            level = logging.WARNING if info.policy == "padg" else logging.DEBUG
            log.log(level, "instance %s did not apply %s: %s", order.instance_id, order, problem)

    # ---- queries ----

    def ttft_budget_left(self, macro_id: str) -> float | None:
        macro = self._macros.get(macro_id)
        return None if macro is None else macro.dispatcher.ttft_budget_left()

    # ---- admin ----

    def summary(self, macro_id: str) -> dict[str, Any]:
        macro = self._macros.get(macro_id)
        excluded = {i: r for i, r in self.excluded.items() if self._macro_of(i) == macro_id}
        base: dict[str, Any] = {
            "policy": "padg",
            "variant": self.scheduling.padg_variant,
            "excluded": excluded,
        }
        if macro is None:
            stored = self._stored.get(macro_id, StoredWindow())
            return {
                **base,
                "active": None,
                "window_epoch": stored.epoch,
                "windows_opened": dict(stored.opened),
                "pending": 0,
            }
        return {
            **base,
            "active": macro.dispatcher.active,
            "window_epoch": macro.book.epoch,
            "window_opened_at": macro.book.opened_at,
            "windows_opened": dict(macro.book.opened),
            "pending": sum(1 for w in macro.pending if not w.future.done()),
            "ttft_budget_left": round(macro.dispatcher.ttft_budget_left(), 6),
            "pending_reason": _pending_reason(macro),
            "rolling_order": macro.dispatcher.members,
        }


def _pending_reason(macro: _Macro) -> list[str] | None:
    """The admission verdicts that keep the oldest request waiting (None when nothing waits)."""
    last = macro.last_pending
    if last is None or not any(not w.future.done() for w in macro.pending):
        return None
    return [f"{v.instance_id}: {v.rule}: {v.detail}" for v in last.verdicts] or [last.message]


def _call(hook: Callable[..., None], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("PaDG hook %r failed", hook)
