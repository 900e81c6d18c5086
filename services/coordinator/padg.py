"""PaDG request dispatch inside one macro instance: rolling activation (research/ecoserve.md §3–§4).

The members take turns, in a fixed cyclic order, being the activated (prefill) instance. A new request goes
to the activated instance while it passes the admission check; when it fails, the activation rolls on to
the next instance in the cycle, which opens a new prefill window at that moment and the old one returns to
pure decoding. Two variants, chosen by `PadgConfig.variant`:

- "paper" (Algorithm 1): try the activated instance, then the others in cyclic order, each with the full
  check; the first that passes gets the request. If none passes the request is `Pending`: the caller keeps
  it and asks again later (after the next status reports), oldest first.
- "authors" (the official code): check only the activated instance (with the look-ahead at the next one);
  on a reject, switch to the next instance and give it the request without checking it. Never pending.

`decide` commits its decision to the dispatcher's state (window, activation); if the instance then does not
take the request, call `cancel`. An `Assign` carrying an `Activation` asks the caller to tell the new
instance to prefill and the previous one to stop. Pure: no I/O, no clock; `now` is unix seconds, the clock
of the instances' RequestProgress timestamps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from services.coordinator.dispatch import Unavailable
from services.coordinator.padg_checks import Verdict, authors_check, paper_check
from services.coordinator.padg_views import Admitted, InstanceView, StatusDelta, Window
from services.coordinator.prefill_model import PrefillModel
from services.coordinator.registry import UnknownInstance
from shared.messages import InstanceStatus

Variant = Literal["paper", "authors"]
VARIANTS: tuple[Variant, ...] = ("paper", "authors")


@dataclass(frozen=True)
class PadgConfig:
    ttft_slo: float  # seconds
    tpot_slo: float  # seconds
    variant: Variant = "paper"
    retry_after: float = 1.0  # seconds, suggested to clients when no member is ready

    def __post_init__(self) -> None:
        for name in ("ttft_slo", "tpot_slo", "retry_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


@dataclass(frozen=True, slots=True)
class PadgRequest:
    request_id: str
    prompt_tokens: int
    arrival_time: float  # unix seconds at the router


@dataclass(frozen=True, slots=True)
class Activation:
    """The prefill activation moved: `activate` is the prefill instance now, `deactivate` (if any) goes
    back to decoding."""

    activate: str
    deactivate: str | None
    # Mean saved TPOT of the newly activated instance's decodes at activation (None: nothing was
    # decoding): the slack it built up while others prefilled, mitosis's contraction signal.
    saved_tpot: float | None


AssignReason = Literal["sticky", "rolled", "switched", "activated", "single_member"]


@dataclass(frozen=True, slots=True)
class Assign:
    """Send the request to `instance_id`. Reasons: the activated instance passed ("sticky"); it failed and
    a later instance of the cycle passed ("rolled"); it failed and the next one takes the request unchecked
    ("switched", authors' variant); nothing was activated ("activated"); one member ("single_member", where
    PaDG degenerates to NoDG)."""

    instance_id: str
    reason: AssignReason
    prefill_time: float  # predicted seconds on that instance
    kv_blocks: int
    activation: Activation | None = None
    verdicts: tuple[Verdict, ...] = ()  # the checks made, in order


@dataclass(frozen=True, slots=True)
class Pending:
    """Paper variant: no member can take the request now; keep it and ask again later."""

    message: str
    verdicts: tuple[Verdict, ...]


PadgDecision = Assign | Pending | Unavailable


class MacroInstanceDispatcher:
    """State of one macro instance: members in cyclic order, their views, the activated instance."""

    def __init__(self, config: PadgConfig):
        self.config = config
        self._order: list[str] = []
        self._views: dict[str, InstanceView] = {}
        self._active: str | None = None
        self._resume: str | None = None  # where the cycle continues after the activated instance left

    # ---- membership ----

    @property
    def members(self) -> list[str]:
        return list(self._order)

    @property
    def active(self) -> str | None:
        return self._active

    def view(self, instance_id: str) -> InstanceView:
        try:
            return self._views[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    def join(
        self,
        instance_id: str,
        *,
        block_size: int,
        kv_blocks_total: int,
        prefill_model: PrefillModel,
        status: InstanceStatus | None = None,
        ready: bool = True,
    ) -> None:
        """Add a member at the end of the cycle. Without `status` it counts as empty (freshly started);
        pass the last report of an instance that moved from another macro instance."""
        if instance_id in self._views:
            raise ValueError(f"instance {instance_id!r} is already a member")
        view = InstanceView(instance_id, block_size, kv_blocks_total, prefill_model, ready=ready)
        if status is not None:
            view.observe(status)
        self._views[instance_id] = view
        self._order.append(instance_id)

    def leave(self, instance_id: str) -> InstanceView:
        """Take a member out of the cycle (drained, lost, or moved); returns its view."""
        view = self.view(instance_id)
        index = self._order.index(instance_id)
        del self._views[instance_id]
        self._order.remove(instance_id)
        follower = self._order[index % len(self._order)] if self._order else None
        if self._active == instance_id:
            self._active, self._resume = None, follower
        elif self._resume == instance_id:
            self._resume = follower
        return view

    def set_ready(self, instance_id: str, ready: bool) -> None:
        """Whether the caller lets the member take requests (a member that is not ready is skipped)."""
        self.view(instance_id).ready = ready

    def restore_activation(self, instance_id: str, opened_at: float) -> None:
        """A coordinator that took over resumes the persisted activation. What the window admitted before is
        unknown; its requests that are still unprefilled count as carried-over work (paper variant)."""
        view = self.view(instance_id)
        if self._active is not None and self._active != instance_id:
            self._views[self._active].window = None
        view.window = Window(opened_at)
        self._active, self._resume = instance_id, None

    # ---- status reports ----

    def observe(self, status: InstanceStatus) -> StatusDelta | None:
        """Apply a member's status report; None when the instance is not a member."""
        view = self._views.get(status.instance_id)
        return view.observe(status) if view is not None else None

    def cancel(self, instance_id: str, request_id: str) -> bool:
        """The instance did not take a request `decide` assigned to it (the activation stays)."""
        view = self._views.get(instance_id)
        return view.cancel(request_id) if view is not None else False

    def ttft_budget_left(self) -> float:
        """Seconds of prefill the activated instance's window can still admit (the TTFT SLO when no window
        is open; negative when over-committed)."""
        view = self._views.get(self._active) if self._active is not None else None
        used = view.window.prefill_time if view is not None and view.window is not None else 0.0
        return self.config.ttft_slo - used

    # ---- dispatch ----

    def decide(self, request: PadgRequest, now: float) -> PadgDecision:
        eligible = [i for i in self._order if self._views[i].eligible]
        if not eligible:
            return Unavailable(
                f"no ready instance among the {len(self._order)} members", self.config.retry_after
            )
        first = self._first(eligible)
        if len(eligible) == 1:
            return self._commit(first, request, now, "single_member", ())
        start = eligible.index(first)
        cycle = eligible[start:] + eligible[:start]
        if self.config.variant == "paper":
            return self._paper(cycle, request, now)
        return self._authors(cycle, request, now)

    def _paper(self, cycle: list[str], request: PadgRequest, now: float) -> PadgDecision:
        verdicts: list[Verdict] = []
        for instance_id in cycle:
            view = self._views[instance_id]
            verdict = paper_check(
                view,
                self._window(instance_id, now),
                self._price(view, request, now),
                ttft_slo=self.config.ttft_slo,
                tpot_slo=self.config.tpot_slo,
                now=now,
            )
            verdicts.append(verdict)
            if verdict.ok:
                return self._commit(instance_id, request, now, self._reason(instance_id), tuple(verdicts))
        return Pending(f"none of the {len(cycle)} ready members passed the admission check", tuple(verdicts))

    def _authors(self, cycle: list[str], request: PadgRequest, now: float) -> PadgDecision:
        # The code always has a prefill instance; with none activated (start, or it left or is not ready)
        # the first of the cycle is checked as if its window opened now.
        current, following = self._views[cycle[0]], self._views[cycle[1]]
        verdict = authors_check(
            current,
            self._window(current.instance_id, now),
            following,
            members=len(cycle),
            r=self._price(current, request, now),
            ttft_slo=self.config.ttft_slo,
            tpot_slo=self.config.tpot_slo,
            now=now,
        )
        if verdict.ok:
            reason = self._reason(current.instance_id)
            return self._commit(current.instance_id, request, now, reason, (verdict,))
        return self._commit(following.instance_id, request, now, "switched", (verdict,))

    # ---- helpers ----

    def _first(self, eligible: list[str]) -> str:
        """The member to try first: the activated one, else the next eligible one after it (or after where
        the departed activated instance stood)."""
        if self._active in eligible:
            return self._active
        anchor, offset = (self._active, 1) if self._active is not None else (self._resume, 0)
        if anchor is None:
            return eligible[0]
        index, size = self._order.index(anchor), len(self._order)
        for step in range(offset, size + offset):
            candidate = self._order[(index + step) % size]
            if candidate in eligible:
                return candidate
        return eligible[0]

    def _window(self, instance_id: str, now: float) -> Window:
        window = self._views[instance_id].window
        if instance_id == self._active and window is not None:
            return window
        return Window(now)  # the window it would open if activated now

    def _reason(self, instance_id: str) -> AssignReason:
        if instance_id == self._active:
            return "sticky"
        return "activated" if self._active is None else "rolled"

    @staticmethod
    def _price(view: InstanceView, request: PadgRequest, now: float) -> Admitted:
        return view.price(request.request_id, request.prompt_tokens, request.arrival_time, now)

    def _commit(
        self,
        instance_id: str,
        request: PadgRequest,
        now: float,
        reason: AssignReason,
        verdicts: tuple[Verdict, ...],
    ) -> Assign:
        view = self._views[instance_id]
        activation = None
        if instance_id != self._active or view.window is None:
            previous = self._active
            if previous is not None:
                self._views[previous].window = None  # its window's bookkeeping ends with the window
            activation = Activation(
                activate=instance_id,
                deactivate=previous,
                saved_tpot=view.mean_saved_tpot(self.config.tpot_slo, now),
            )
            view.window = Window(now)
            self._active, self._resume = instance_id, None
        admitted = self._price(view, request, now)
        view.admit(admitted)
        return Assign(
            instance_id=instance_id,
            reason=reason,
            prefill_time=admitted.prefill_time,
            kv_blocks=admitted.kv_blocks,
            activation=activation,
            verdicts=verdicts,
        )
