"""PaDG's prefill window on the instance side: the coordinator's PrefillWindow messages, applied in order.

A window change runs in the engine thread between steps (`PaDGPolicy.set_prefill_active`, timed on the
engine's clock), and its effect on the event loop side (window state, epoch, output hold) is queued from
there too: behind the outputs of every step before the change, ahead of every step after it. So the output
hold begins exactly with the window's first step.

Epochs only grow: a PrefillWindow older than the latest one accepted is answered ok but changes nothing, so a
late or retried message cannot undo a newer change; the same epoch again is applied again (idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.instance.engine.async_engine import AsyncEngine, EngineDeadError
from services.instance.engine.llm_engine import LLMEngine
from services.instance.engine.policies import PaDGPolicy
from services.instance.step_publisher import StepPublisher
from shared.messages import AdminReply, ErrorReply, PrefillWindow

log = logging.getLogger(__name__)


class PrefillWindowControl:
    def __init__(self, engine: AsyncEngine, publisher: StepPublisher, changed: Callable[[], None]):
        self._engine = engine
        self._publisher = publisher
        self._changed = changed  # the window moved: report it now
        policy = engine.engine.scheduler.policy
        self._policy_name = policy.name
        # For status reports: whether the window is open (None: not a padg engine), the latest epoch applied.
        self.open: bool | None = policy.activated if isinstance(policy, PaDGPolicy) else None
        self.epoch = 0
        self._accepted = 0  # the latest epoch accepted (applied, or queued in the engine thread)

    async def apply(self, window: PrefillWindow) -> AdminReply | ErrorReply:
        if self.open is None:
            return AdminReply(
                ok=False, error=f"this instance runs the {self._policy_name} policy: no prefill window (padg)"
            )
        if window.hold_outputs and not window.ttft_slo >= 0:
            return ErrorReply(
                code="bad_request", field="ttft_slo", message=f"must be >= 0 seconds, got {window.ttft_slo}"
            )
        if window.epoch < self._accepted:
            log.info("ignoring a stale PrefillWindow (epoch %d < %d)", window.epoch, self._accepted)
            return AdminReply(ok=True, result=self._result(applied=False, stale=True))
        self._accepted = window.epoch
        loop = asyncio.get_running_loop()
        clock = self._engine.clock

        def switch(core: LLMEngine) -> bool:
            policy = core.scheduler.policy
            if not isinstance(policy, PaDGPolicy):
                raise RuntimeError(f"the engine's policy is {policy.name}, not padg")
            now = clock()
            changed = policy.set_prefill_active(window.active, now)
            loop.call_soon_threadsafe(self._applied, window, now)
            return changed

        try:
            changed = await self._engine.call(switch)
        except (EngineDeadError, RuntimeError) as exc:
            return AdminReply(ok=False, result=self._result(applied=False, stale=False), error=str(exc))
        log.info(
            "prefill window %s (epoch %d%s)",
            "opened" if window.active else "closed",
            window.epoch,
            "" if changed else ", unchanged",
        )
        return AdminReply(ok=True, result={**self._result(applied=True, stale=False), "changed": changed})

    def _applied(self, window: PrefillWindow, now: float) -> None:
        """On the event loop, between the last step before the change and the first after it."""
        self.open = window.active
        self.epoch = max(self.epoch, window.epoch)
        if window.active and window.hold_outputs:
            self._publisher.begin_hold(window.ttft_slo, now)
        else:
            self._publisher.end_hold()
        self._changed()

    def _result(self, *, applied: bool, stale: bool) -> dict[str, object]:
        return {"applied": applied, "stale": stale, "prefill_window": self.open, "window_epoch": self.epoch}
