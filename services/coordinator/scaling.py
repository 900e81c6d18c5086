"""Mitosis scaling, executed: the coordinator feeds a `ScalingController` (instances joining and leaving, TTFT
and saved-TPOT samples, a periodic `tick`), the controller plans with `Mitosis` (mitosis.py) and carries the
plan out through `ClusterOps`, which the leader implements on its registry, Redis and NATS. Every change is
written to the scaling event log (scaling_log.py).

Only control moves, never a model or a KV cache (research/ecoserve.md §5): an instance changes macro
instance by changing which scheduler cycles through it. Instances outside every macro instance form the
spare pool, which the leader keeps as the pseudo macro instance `SPARE_POOL` (so the registry and Redis
persist it like any other; nothing is ever dispatched to it):
- added: a spare leaves the pool for a macro instance and is told to resume taking requests;
- removed: it leaves its macro instance for the pool, draining (no new requests, it finishes what it
  holds); once it holds nothing, a later tick makes it an idle spare;
- split and merge: members change macro instance in cyclic order; a merged-away macro instance retires.

With `enabled` off the signals are ignored: instances that register join a macro instance at once (`admit`
names it), repairs (below N_l) and operator commands still act. With it on, new instances wait in the pool
until the TTFT signal (or a repair) calls for them.

The overall scheduler (which macro instance a request goes to) is `choose_macro`: overall_scheduler.py's
rule named by `macro_choice`, over the macro instances this controller knows, never the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from services.coordinator.mitosis import (
    Action,
    AddInstance,
    Merge,
    Mitosis,
    MitosisConfig,
    RemoveInstance,
    Signals,
    Split,
)
from services.coordinator.overall_scheduler import MacroChoice, MacroLoad, make_choice
from services.coordinator.padg import Activation
from services.coordinator.padg_views import StatusDelta
from services.coordinator.scaling_log import ScalingEvent
from services.coordinator.scaling_settings import ScalingSettings
from services.coordinator.scaling_store import ScalingStore

log = logging.getLogger(__name__)

Operation = Callable[[], Awaitable[None]]
Step = tuple[ScalingEvent, Operation]  # an event to log once the operation carrying it out has succeeded

SPARE_POOL = "spare"  # the registry's macro instance id for the pool (Mitosis never names one so)


class ScalingError(Exception):
    """An operator's scaling command that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Who is where, as the leader's registry has it."""

    macros: dict[str, list[str]] = field(default_factory=dict)  # serving; members in cyclic order
    spares: list[str] = field(default_factory=list)  # in the pool, idle
    draining: list[str] = field(default_factory=list)  # in the pool, finishing what they hold


class ClusterOps(Protocol):
    """What the controller needs from the leader. Instances no longer registered are skipped, not errors."""

    def layout(self) -> Layout:
        """The current membership (read at start-up, and again to recover from a failed change)."""
        ...

    def holds_work(self, instance_id: str) -> bool:
        """The instance still has requests (running, waiting, or dispatched and not yet reported); True
        while unsure (not heard from since the coordinator took over)."""
        ...

    async def move(self, macro_id: str, instance_ids: Sequence[str]) -> None:
        """Make them members of `macro_id` (created when new), appended to its cycle in this order, ready for
        requests; they leave the pool or the macro instance they were in. One that was draining is told to
        resume. Persisted before it returns."""
        ...

    async def drain(self, instance_id: str) -> None:
        """Move it from its macro instance to the pool and tell it to drain: no new requests."""
        ...

    async def spare(self, instance_id: str) -> None:
        """A draining instance in the pool holds nothing any more: it is an idle spare."""
        ...

    async def retire_macro(self, macro_id: str) -> None:
        """`macro_id` has no members left (merged away, or its last member left): forget it."""
        ...

    async def changed(self, reason: str) -> None:
        """Membership changed: tell the routers (ClusterChanged)."""
        ...


class EventSink(Protocol):
    async def append(self, events: Sequence[ScalingEvent]) -> list[str]: ...

    async def recent(self, count: int) -> list[ScalingEvent]: ...


class ScalingController:
    def __init__(
        self,
        ops: ClusterOps,
        config: MitosisConfig,
        settings: ScalingSettings | None = None,
        *,
        events: EventSink | None = None,
        store: ScalingStore | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._ops = ops
        self._events = events
        self._store = store
        self._clock = clock  # wall clock, for event times only; planning uses the `now` it is given
        self._monotonic = monotonic  # for samples from PaDG hooks, which carry no time
        self.settings = settings or ScalingSettings()
        self._choice: MacroChoice = make_choice(self.settings.macro_choice)
        self._lock = asyncio.Lock()  # one change at a time: ticks and operator commands interleave
        # Planned by admissions, outside the lock: carried out (and logged, in order) by whichever change
        # runs next; the event is made at admission, so its time is when it happened.
        self._queued: list[Step] = []
        # FuDG (the leader sets it): its pairing spans the cluster and its instances feed no PaDG signals, so
        # the autoscaler stands aside: new instances serve at once, signals are not acted on.
        self.paused = False
        self._restore(config)

    def _restore(self, config: MitosisConfig) -> None:
        layout = self._ops.layout()
        if SPARE_POOL in layout.macros:
            raise ValueError(f"the pool {SPARE_POOL!r} is not a macro instance")
        self._mitosis = Mitosis(config, layout.macros, spares=layout.spares, draining=layout.draining)
        self._queued.clear()
        self._macro_ids = set(layout.macros)  # as the leader has them: a vanished one is retired

    @property
    def config(self) -> MitosisConfig:
        return self._mitosis.config

    @property
    def macros(self) -> dict[str, list[str]]:
        return self._mitosis.macros

    @property
    def spares(self) -> list[str]:
        return self._mitosis.spares

    @property
    def draining(self) -> list[str]:
        return self._mitosis.draining

    # ---- fed by the leader ----

    def admit(self, instance_id: str) -> str:
        """Where a newly registered instance goes; the leader registers it there. Autoscaling on: the pool
        (a repair or an expansion takes it out). Off: a macro instance at once, as an expansion would place
        it; a split that causes is carried out by the next tick. A known instance keeps its place."""
        if instance_id in self._mitosis.spares or instance_id in self._mitosis.draining:
            return SPARE_POOL
        known = self._mitosis.macro_of(instance_id)
        if known is not None:
            return known
        self._mitosis.add_spare(instance_id)
        if self._autoscaling:
            return SPARE_POOL
        add, *rest = self._mitosis.assign(instance_id, None, "registered")
        assert isinstance(add, AddInstance)
        self._queued.append((self._action_event(add, "join", None), _done))  # the leader registers it there
        self._queued += self._steps("join", rest, None)
        return add.macro_id

    async def lost(self, instance_id: str, reason: str) -> None:
        """The instance is gone (lease expired, deregistered, or its registration failed); a macro instance
        it leaves short is repaired by the next tick."""
        macro = self._mitosis.macro_of(instance_id)
        if self._mitosis.lose(instance_id):
            await self._record(
                [self._event("lost", "departed", (macro,) if macro else (), (instance_id,), reason)]
            )

    def observe_ttft(self, ttft: float, now: float) -> None:
        """A request's time to first token (seconds), seen at `now` (monotonic)."""
        self._mitosis.observe_ttft(ttft, now)

    def observe_activation(self, macro_id: str, saved_tpot: float | None, now: float) -> None:
        """`macro_id` activated an instance whose decodes had this mean saved TPOT (None: none decoding)."""
        self._mitosis.observe_activation(macro_id, saved_tpot, now)

    def on_status_delta(self, macro_id: str, instance_id: str, delta: StatusDelta) -> None:
        """PadgHooks.status_delta: the TTFTs a status report revealed."""
        now = self._monotonic()
        for _, ttft in delta.ttfts:
            self._mitosis.observe_ttft(ttft, now)

    def on_activation(self, macro_id: str, activation: Activation, epoch: int) -> None:
        """PadgHooks.activation: the saved TPOT of the instance that just took the prefill window."""
        self._mitosis.observe_activation(macro_id, activation.saved_tpot, self._monotonic())

    async def tick(self, now: float) -> list[ScalingEvent]:
        """Finish drains, carry out what admissions planned, repair, and (when enabled) act on the signals;
        what was done."""
        async with self._lock:
            signals = self._mitosis.signals(now)
            done = await self._run_queued()
            done += await self._finish_drains(signals)
            steps = self._steps("repair", self._mitosis.repair(), signals)
            if self._autoscaling:
                step = self._mitosis.tick(now)
                cause = "expand" if any(isinstance(action, AddInstance) for action in step) else "contract"
                steps += self._steps(cause, step, signals)
            return done + await self._run(steps)

    @property
    def _autoscaling(self) -> bool:
        return self.settings.enabled and not self.paused

    # ---- the overall scheduler ----

    def choose_macro(
        self, ready_members: Mapping[str, int], ttft_budget_left: Mapping[str, float | None] | None = None
    ) -> str | None:
        """The macro instance for the next request (None: none has a ready member). `ready_members`: macro
        instance → its members that can take requests now; `ttft_budget_left`: the dispatchers' budgets,
        used by `most_ttft_budget`."""
        budgets = ttft_budget_left or {}
        loads = [MacroLoad(m, ready_members.get(m, 0), budgets.get(m)) for m in self._mitosis.macros]
        return self._choice.choose(loads)

    # ---- operator commands ----

    async def add_instance(
        self, now: float, instance_id: str | None = None, macro_id: str | None = None
    ) -> list[ScalingEvent]:
        """Take a spare (the first, or `instance_id`) into `macro_id`, or where an expansion would put it."""
        async with self._lock:
            await self._run_queued()  # before planning: the plan must not overtake them (nor its log)
            signals = self._mitosis.signals(now)
            if instance_id is None:
                if not self._mitosis.spares:
                    draining = ", ".join(self._mitosis.draining)
                    raise ScalingError(
                        "no spare instance" + (f" ({draining} still draining)" if draining else "")
                    )
                instance_id = self._mitosis.spares[0]
            try:
                actions = self._mitosis.assign(instance_id, macro_id, "asked by an operator")
            except ValueError as error:
                raise ScalingError(str(error)) from None
            self._mitosis.settle(now)
            return await self._run(self._steps("manual", actions, signals))

    async def remove_instance(self, now: float, instance_id: str) -> list[ScalingEvent]:
        """Take a member out of its macro instance: it drains, then returns to the pool."""
        async with self._lock:
            await self._run_queued()
            signals = self._mitosis.signals(now)
            try:
                actions = self._mitosis.release(instance_id, "asked by an operator")
            except ValueError as error:
                raise ScalingError(str(error)) from None
            self._mitosis.settle(now)
            return await self._run(self._steps("manual", actions, signals))

    def check_bounds(self, **bounds: Any) -> MitosisConfig:
        """The configuration these bounds (`n_lower`, `n_upper`, `ttft_slo`; the others unchanged) would make;
        ScalingError when they do not fit together. For callers to check before persisting them."""
        current = self._mitosis.config
        values = {"n_lower": current.n_lower, "n_upper": current.n_upper, "ttft_slo": current.ttft_slo}
        values.update({k: v for k, v in bounds.items() if v is not None})
        try:
            return self.settings.mitosis_config(**values)
        except (TypeError, ValueError) as error:
            raise ScalingError(str(error)) from None

    async def set_bounds(
        self,
        now: float,
        *,
        n_lower: int | None = None,
        n_upper: int | None = None,
        ttft_slo: float | None = None,
    ) -> None:
        """Apply changed scheduling configuration keys (the leader persists them; ScalingError if invalid)."""
        config = self.check_bounds(n_lower=n_lower, n_upper=n_upper, ttft_slo=ttft_slo)
        if config == self._mitosis.config:
            return
        async with self._lock:
            self._mitosis.reconfigure(config, now)
        reason = f"n_lower={config.n_lower} n_upper={config.n_upper} ttft_slo={config.ttft_slo}"
        await self._record([self._event("configure", "config", reason=reason)])

    async def update_settings(self, updates: Mapping[str, Any], now: float) -> ScalingSettings:
        """Validate, persist and apply scaling settings (SettingsError naming a bad key, ScalingError when the
        signal timing does not fit the bounds)."""
        settings = self.settings.updated(updates)
        current = self._mitosis.config
        try:
            config = settings.mitosis_config(
                n_lower=current.n_lower, n_upper=current.n_upper, ttft_slo=current.ttft_slo
            )
        except ValueError as error:
            raise ScalingError(str(error)) from None
        if self._store is not None:
            await self._store.save(settings, updates)
        async with self._lock:
            self._mitosis.reconfigure(config, now)
            if settings.macro_choice != self.settings.macro_choice:
                self._choice = make_choice(settings.macro_choice)
            self.settings = settings
        text = settings.to_text()
        changed = " ".join(f"{key}={text[key]}" for key in updates)
        await self._record([self._event("configure", "config", reason=changed)])
        return settings

    # ---- views ----

    def view(self, now: float) -> dict[str, Any]:
        """For `ecoserve admin status` and `scaling`."""
        signals = self._mitosis.signals(now)
        config = self._mitosis.config
        return {
            "enabled": self.settings.enabled,
            "settings": {
                **self.settings.to_dict(),
                "n_lower": config.n_lower,
                "n_upper": config.n_upper,
                "ttft_slo": config.ttft_slo,
            },
            "macro_instances": [
                {"macro_instance_id": m, "members": ms} for m, ms in self._mitosis.macros.items()
            ],
            "spares": self._mitosis.spares,
            "draining": self._mitosis.draining,
            "signals": {
                "mean_ttft": signals.mean_ttft,
                "slack_ratio": _finite(signals.slack_ratio),
                "overloaded": signals.overloaded,
                "over_provisioned": signals.over_provisioned,
                "cooling_down": signals.cooling_down,
            },
        }

    async def recent_events(self, count: int) -> list[ScalingEvent]:
        return await self._events.recent(count) if self._events is not None else []

    # ---- carrying out ----

    async def _finish_drains(self, signals: Signals) -> list[ScalingEvent]:
        events = []
        for instance_id in self._mitosis.draining:
            if self._ops.holds_work(instance_id):
                continue
            self._mitosis.drained(instance_id)
            event = self._event(
                "spare", "drained", (), (instance_id,), "finished what it held", signals=signals
            )
            if not await self._execute([(event, lambda i=instance_id: self._ops.spare(i))]):
                break
            events.append(event)
        if events:
            await self._record(events)
        return events

    def _steps(self, cause: str, actions: Sequence[Action], signals: Signals | None) -> list[Step]:
        return [(self._action_event(action, cause, signals), self._operation(action)) for action in actions]

    async def _run_queued(self) -> list[ScalingEvent]:
        steps, self._queued = self._queued, []
        return await self._run(steps)

    async def _run(self, steps: list[Step]) -> list[ScalingEvent]:
        """Carry out the steps in order, retire vanished macro instances, announce and log; the events of
        what was done."""
        completed = await self._execute(steps)
        done = [event for event, _ in steps[:completed]]
        if completed == len(steps):
            for macro_id in sorted(self._macro_ids - set(self._mitosis.macros)):
                try:
                    await self._ops.retire_macro(macro_id)
                except Exception:
                    log.exception("retiring macro instance %s failed", macro_id)
            self._macro_ids = set(self._mitosis.macros)
        if done:
            try:
                await self._ops.changed(f"scaling: {', '.join(sorted({e.action for e in done}))}")
            except Exception:
                log.exception("announcing a scaling change failed")
            await self._record(done)
        return done

    def _operation(self, action: Action) -> Operation:
        """The (not yet awaited) operation carrying out `action`."""
        match action:
            case AddInstance(instance_id=instance_id, macro_id=macro_id):
                return lambda: self._ops.move(macro_id, [instance_id])
            case RemoveInstance(instance_id=instance_id):
                return lambda: self._ops.drain(instance_id)
            case Split(new_macro_id=macro_id, moved=moved) | Merge(target=macro_id, moved=moved):
                return lambda: self._ops.move(macro_id, list(moved))
        raise AssertionError(f"unknown action {action!r}")

    async def _execute(self, steps: Sequence[Step]) -> int:
        """Run the operations in order; how many succeeded. After a failure the rest of the plan is dropped
        and membership reread from the leader: the planner had already counted the plan done."""
        for index, (event, operation) in enumerate(steps):
            try:
                await operation()
            except Exception:
                log.exception("scaling %s %s failed; rereading membership", event.action, event.instances)
                self._restore(self._mitosis.config)
                return index
        return len(steps)

    async def _record(self, events: list[ScalingEvent]) -> None:
        for event in events:
            log.info(
                "scaling: %s (%s) macros=%s instances=%s: %s",
                event.action,
                event.cause,
                ",".join(event.macros),
                ",".join(event.instances),
                event.reason,
            )
        if self._events is None or not events:
            return
        try:
            await self._events.append(events)
        except (RedisError, OSError) as error:
            # The change itself was made; only its record is missing.
            log.warning("could not log %d scaling events: %s", len(events), error)

    def _action_event(self, action: Action, cause: str, signals: Signals | None) -> ScalingEvent:
        match action:
            case AddInstance():
                return self._event(
                    "add", cause, (action.macro_id,), (action.instance_id,), action.reason, signals=signals
                )
            case RemoveInstance():
                return self._event(
                    "remove", cause, (action.macro_id,), (action.instance_id,), action.reason, signals=signals
                )
            case Split():
                reason = f"{action.source} exceeded N_u={self.config.n_upper}"
                return self._event(
                    "split",
                    cause,
                    (action.source, action.new_macro_id),
                    action.moved,
                    reason,
                    signals=signals,
                )
            case Merge():
                reason = f"together within N_u={self.config.n_upper}"
                return self._event(
                    "merge", cause, (action.source, action.target), action.moved, reason, signals=signals
                )
        raise AssertionError(f"unknown action {action!r}")

    def _event(
        self,
        action: str,
        cause: str,
        macros: Sequence[str] = (),
        instances: Sequence[str] = (),
        reason: str = "",
        *,
        signals: Signals | None = None,
    ) -> ScalingEvent:
        return ScalingEvent(
            time=self._clock(),
            action=action,
            cause=cause,
            macros=tuple(macros),
            instances=tuple(instances),
            reason=reason,
            mean_ttft=signals.mean_ttft if signals else None,
            slack_ratio=signals.slack_ratio if signals else None,
        )


async def _done() -> None:
    """The operation of an action the leader carried out itself (an admission)."""


def _finite(value: float | None) -> float | str | None:
    return "inf" if value == float("inf") else value
