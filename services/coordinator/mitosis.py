"""Mitosis scaling (research/ecoserve.md §5): grow and shrink the serving capacity one instance at a time,
splitting a macro instance that outgrows N_u and merging two that together fit N_u. Pure: it plans, the
caller executes. Every action moves only control (instance ids); no model or KV cache moves, and a removed
instance first finishes what it holds (it drains, then `drained` puts it in the spare pool).

Signals, each with hysteresis (the condition must hold for `hold` seconds without a break) and a cool-down
of `cooldown` seconds after any action, after which only samples taken since the action count:
- expand when the mean TTFT over the last `window` seconds exceeds the TTFT SLO (paper Eq. 1);
- contract when the macro instances' decodes save more than the TTFT SLO·(n+1)/n of TPOT (Eq. 2): each
  activation reports the saved TPOT of the newly activated instance, divided by the bound of its macro
  instance's size n; the median of these ratios over the window above 1 means over-provisioned. The median,
  because slack is unbounded above (it grows with output length, and is infinite when nothing decodes).

Placement (the paper's Figure 7):
- expand: into the fullest macro instance below N_u, so a split-off one waits until the original is refilled
  to N_u; when all are full, into one of them, which then exceeds N_u and splits into a new macro instance of
  N_l members (its last N_l in cyclic order) and the rest.
- contract: the last member of the smallest macro instance above N_l; when every one is at N_l, the last
  member of the smallest, merged at once into another (2·N_l − 1 ≤ N_u, so it fits). After a removal two
  macro instances that together fit N_u merge, the smaller into the larger.
- repair, outside the signals: macro instances below N_l take spares at once (the first spares form the first
  macro instance), and one that stays below N_l merges into another where it fits.
- by hand (operators, and instances that join while autoscaling is off): `assign` places a spare like an
  expansion does (or into a named macro instance), `release` removes a member like a contraction does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.coordinator.scaling_signals import SampleWindow, Sustained


@dataclass(frozen=True)
class MitosisConfig:
    n_lower: int  # N_l: fewest members of a macro instance
    n_upper: int  # N_u: most members of a macro instance
    ttft_slo: float  # seconds
    window: float = 30.0  # seconds of samples the signals average over
    min_samples: int = 8  # fewer samples in the window than this is no evidence
    hold: float = 10.0  # seconds a signal must hold before acting
    cooldown: float = 60.0  # seconds after an action before the next one
    macro_prefix: str = "m"  # new macro instances are named prefix + counter

    def __post_init__(self) -> None:
        if self.n_lower < 1:
            raise ValueError(f"n_lower must be at least 1, got {self.n_lower}")
        # A split of N_u + 1 members must leave both halves at N_l or more.
        if 2 * self.n_lower > self.n_upper + 1:
            raise ValueError(f"n_upper must be at least 2·n_lower − 1, got {self.n_lower}/{self.n_upper}")
        for name in ("ttft_slo", "window"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        for name in ("hold", "cooldown"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(
                    f"{name} must be a non-negative number of seconds, got {getattr(self, name)}"
                )
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")


@dataclass(frozen=True, slots=True)
class AddInstance:
    """Move `instance_id` from the spare pool into `macro_id` (a new macro instance when `new_macro`)."""

    instance_id: str
    macro_id: str
    new_macro: bool
    reason: str


@dataclass(frozen=True, slots=True)
class RemoveInstance:
    """Take `instance_id` out of `macro_id` and drain it; call `Mitosis.drained` when it holds nothing."""

    instance_id: str
    macro_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Split:
    """`moved` leave `source` (in this order) and form the new macro instance `new_macro_id`."""

    source: str
    new_macro_id: str
    moved: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Merge:
    """`source`'s members join the end of `target`'s cycle; `source` ceases to exist."""

    source: str
    target: str
    moved: tuple[str, ...]


Action = AddInstance | RemoveInstance | Split | Merge


@dataclass(frozen=True, slots=True)
class Signals:
    """The current evidence, for metrics and the admin view."""

    mean_ttft: float | None  # seconds; None with too few samples
    slack_ratio: float | None  # median saved TPOT / its bound; None with too few samples
    overloaded: bool
    over_provisioned: bool
    cooling_down: bool


class Mitosis:
    def __init__(
        self,
        config: MitosisConfig,
        macros: Mapping[str, Sequence[str]] | None = None,
        spares: Iterable[str] = (),
        draining: Iterable[str] = (),
    ):
        self.config = config
        self._macros: dict[str, list[str]] = {m: list(members) for m, members in (macros or {}).items()}
        self._spares: list[str] = []
        self._draining: dict[str, str] = {}  # instance → the macro instance it was removed from
        for instance_id in spares:
            self.add_spare(instance_id)
        for instance_id in draining:
            # Removed before a restart: which macro instance it left is not remembered, nor needed.
            if self._known(instance_id):
                raise ValueError(f"instance {instance_id!r} is already known")
            self._draining[instance_id] = ""
        self._next_id = _next_counter(self._macros, config.macro_prefix)
        self._ttfts = SampleWindow(config.window)
        self._slack = SampleWindow(config.window)
        self._expand = Sustained(config.hold)
        self._contract = Sustained(config.hold)
        self._last_action = -math.inf

    # ---- state ----

    @property
    def macros(self) -> dict[str, list[str]]:
        """Macro instance → members in cyclic order, in creation order."""
        return {m: list(members) for m, members in self._macros.items()}

    @property
    def spares(self) -> list[str]:
        return list(self._spares)

    @property
    def draining(self) -> list[str]:
        return list(self._draining)

    def macro_of(self, instance_id: str) -> str | None:
        return next((m for m, members in self._macros.items() if instance_id in members), None)

    def add_spare(self, instance_id: str) -> None:
        """A new instance waits in the pool until a macro instance needs it."""
        if self._known(instance_id):
            raise ValueError(f"instance {instance_id!r} is already known")
        self._spares.append(instance_id)

    def drained(self, instance_id: str) -> None:
        """A removed instance finished what it held: it is a spare now."""
        if self._draining.pop(instance_id, None) is None:
            raise ValueError(f"instance {instance_id!r} is not draining")
        self._spares.append(instance_id)

    def lose(self, instance_id: str) -> bool:
        """The instance is gone (lease expired, deregistered); False if it was unknown. A macro instance it
        leaves below N_l is repaired by the next `tick`."""
        if instance_id in self._spares:
            self._spares.remove(instance_id)
            return True
        if self._draining.pop(instance_id, None) is not None:
            return True
        macro = self.macro_of(instance_id)
        if macro is None:
            return False
        self._macros[macro].remove(instance_id)
        if not self._macros[macro]:
            del self._macros[macro]
        return True

    def reconfigure(self, config: MitosisConfig, now: float) -> None:
        """Apply new bounds, SLO or signal timing. Evidence and the cool-down clock are kept, except that a
        new TTFT SLO restarts the evidence (saved TPOT was judged against the old one). New bounds apply from
        the next placement: a macro instance above a lowered N_u splits when it next grows."""
        if config.macro_prefix != self.config.macro_prefix:
            raise ValueError("the macro instance prefix cannot change")
        if config.ttft_slo != self.config.ttft_slo:
            self._ttfts.restart(now)
            self._slack.restart(now)
            self._expand.reset()
            self._contract.reset()
        self.config = config
        self._ttfts.span = self._slack.span = config.window
        self._expand.hold = self._contract.hold = config.hold

    def _known(self, instance_id: str) -> bool:
        return (
            instance_id in self._spares
            or instance_id in self._draining
            or self.macro_of(instance_id) is not None
        )

    # ---- signals ----

    def observe_ttft(self, ttft: float, at: float) -> None:
        """A request's time to first token (seconds), observed at `at`."""
        self._ttfts.add(at, ttft)

    def observe_activation(self, macro_id: str, saved_tpot: float | None, at: float) -> None:
        """An instance of `macro_id` was activated for prefill with this mean saved TPOT (None: nothing was
        decoding on it, the most slack there is)."""
        members = self._macros.get(macro_id)
        if not members:
            return
        n = len(members)
        bound = self.config.ttft_slo * (n + 1) / n
        self._slack.add(at, math.inf if saved_tpot is None else saved_tpot / bound)

    def signals(self, now: float) -> Signals:
        mean_ttft = self._ttfts.mean(now, self.config.min_samples)
        ratio = self._slack.median(now, self.config.min_samples)
        overloaded = mean_ttft is not None and mean_ttft > self.config.ttft_slo
        return Signals(
            mean_ttft=mean_ttft,
            slack_ratio=ratio,
            overloaded=overloaded,
            # SLO misses win: never shrink while TTFT is over the SLO.
            over_provisioned=not overloaded and ratio is not None and ratio > 1,
            cooling_down=now - self._last_action < self.config.cooldown,
        )

    # ---- planning ----

    def tick(self, now: float) -> list[Action]:
        """The actions to take now; the planner's state already reflects them."""
        actions = self._repair()
        signals = self.signals(now)
        expand = self._expand.update(signals.overloaded, now)
        contract = self._contract.update(signals.over_provisioned, now)
        if signals.cooling_down:
            return actions
        step: list[Action] = []
        if expand:
            step = self._grow(f"mean TTFT {signals.mean_ttft:.3f}s > SLO {self.config.ttft_slo}s")
        elif contract:
            step = self._shrink(f"median saved TPOT {signals.slack_ratio:.2f}× its bound")
        if step:
            self.settle(now)
        return actions + step

    def settle(self, now: float) -> None:
        """The configuration changed (by `tick`, or by hand): cool down, and let it earn its own evidence."""
        self._last_action = now
        self._ttfts.restart(now)
        self._slack.restart(now)
        self._expand.reset()
        self._contract.reset()

    def repair(self) -> list[Action]:
        """Only the repairs `tick` starts with (macro instances below N_l), without the signals."""
        return self._repair()

    def assign(self, instance_id: str, macro_id: str | None, reason: str) -> list[Action]:
        """Put a spare (or a draining instance, cancelling its removal) into `macro_id`, or where an expansion
        would when None; like an expansion, a macro instance that then exceeds N_u splits."""
        if macro_id is not None and macro_id not in self._macros:
            raise ValueError(f"no macro instance {macro_id!r}")
        if instance_id in self._spares:
            self._spares.remove(instance_id)
        elif self._draining.pop(instance_id, None) is None:
            where = self.macro_of(instance_id)
            raise ValueError(
                f"instance {instance_id!r} is " + (f"already in {where}" if where else "not a spare")
            )
        return self._place(instance_id, macro_id, reason)

    def release(self, instance_id: str, reason: str) -> list[Action]:
        """Take a member out of its macro instance as a contraction would: it drains (call `drained` when it
        holds nothing), a macro instance left empty disappears, and two that then fit N_u merge."""
        macro = self.macro_of(instance_id)
        if macro is None:
            raise ValueError(f"instance {instance_id!r} is not a member of a macro instance")
        if len(self._macros) == 1 and len(self._macros[macro]) == 1:
            # The pool's repair would only put it (or another spare) straight back.
            raise ValueError(f"instance {instance_id!r} is the last one serving")
        self._macros[macro].remove(instance_id)
        self._draining[instance_id] = macro
        if not self._macros[macro]:
            del self._macros[macro]
        return [RemoveInstance(instance_id, macro, reason), *self._merge_fitting()]

    def _grow(self, reason: str) -> list[Action]:
        if not self._spares:
            return []
        return self._place(self._spares.pop(0), None, reason)

    def _place(self, instance_id: str, target: str | None, reason: str) -> list[Action]:
        if target is None:
            if not self._macros:
                return [self._add_new(instance_id, reason)]
            room = [m for m, members in self._macros.items() if len(members) < self.config.n_upper]
            # The fullest one with room; ties go to the older (the dict keeps creation order).
            target = max(room, key=lambda m: len(self._macros[m])) if room else next(iter(self._macros))
        self._macros[target].append(instance_id)
        actions: list[Action] = [AddInstance(instance_id, target, False, reason)]
        if len(self._macros[target]) > self.config.n_upper:
            actions.append(self._split(target))
        return actions

    def _split(self, source: str) -> Split:
        members = self._macros[source]
        moved = members[-self.config.n_lower :]
        del members[-self.config.n_lower :]
        new_id = self._new_id()
        self._macros[new_id] = list(moved)
        return Split(source, new_id, tuple(moved))

    def _shrink(self, reason: str) -> list[Action]:
        n_lower = self.config.n_lower
        above = [m for m, members in self._macros.items() if len(members) > n_lower]
        if above:
            # The smallest; ties go to the newer, the partial one of the paper's steady state.
            target = min(reversed(above), key=lambda m: len(self._macros[m]))
            return [self._remove(target, reason), *self._merge_fitting()]
        if len(self._macros) < 2:
            return []  # one macro instance at N_l: the floor
        target = min(reversed(list(self._macros)), key=lambda m: len(self._macros[m]))
        removal = self._remove(target, reason)
        return [removal, self._merge(target, self._best_partner(target))]

    def _remove(self, macro: str, reason: str) -> RemoveInstance:
        instance_id = self._macros[macro].pop()
        self._draining[instance_id] = macro
        return RemoveInstance(instance_id, macro, reason)

    def _merge_fitting(self) -> list[Action]:
        merges: list[Action] = []
        while len(self._macros) >= 2:
            smallest = min(reversed(list(self._macros)), key=lambda m: len(self._macros[m]))
            partner = self._best_partner(smallest)
            if len(self._macros[smallest]) + len(self._macros[partner]) > self.config.n_upper:
                break
            merges.append(self._merge(smallest, partner))
        return merges

    def _best_partner(self, macro: str) -> str:
        """The smallest other macro instance (the likeliest to fit), ties to the older."""
        others = [m for m in self._macros if m != macro]
        return min(others, key=lambda m: len(self._macros[m]))

    def _merge(self, source: str, target: str) -> Merge:
        moved = self._macros.pop(source)
        self._macros[target].extend(moved)
        return Merge(source, target, tuple(moved))

    def _repair(self) -> list[Action]:
        actions: list[Action] = []
        if not self._macros and self._spares:
            actions.append(self._add_new(self._spares.pop(0), "the first macro instance"))
        for macro, members in self._macros.items():
            while len(members) < self.config.n_lower and self._spares:
                instance_id = self._spares.pop(0)
                members.append(instance_id)
                actions.append(AddInstance(instance_id, macro, False, f"below N_l={self.config.n_lower}"))
        for macro in [m for m, members in self._macros.items() if len(members) < self.config.n_lower]:
            # It may have merged away, or grown as an earlier one's partner.
            if macro not in self._macros or len(self._macros[macro]) >= self.config.n_lower:
                continue
            if len(self._macros) < 2:
                break
            partner = self._best_partner(macro)
            if len(self._macros[macro]) + len(self._macros[partner]) <= self.config.n_upper:
                actions.append(self._merge(macro, partner))
        return actions

    def _add_new(self, instance_id: str, reason: str) -> AddInstance:
        macro = self._new_id()
        self._macros[macro] = [instance_id]
        return AddInstance(instance_id, macro, True, reason)

    def _new_id(self) -> str:
        # Never reuse an id: routers may still cache a merged-away macro instance's entry.
        macro = f"{self.config.macro_prefix}{self._next_id}"
        self._next_id += 1
        return macro


def _next_counter(macros: Mapping[str, object], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    numbers = [int(match.group(1)) for m in macros if (match := pattern.fullmatch(m))]
    return max(numbers, default=-1) + 1
