"""The overall scheduler's choice: which macro instance gets a request (EcoServe's top level, §6 of
research/ecoserve.md). Pure; a `MacroChoice` is swappable by name.

Default, `size_weighted`: smooth weighted round-robin with each macro instance weighted by its number of
ready members. Why this one:
- capacity is per instance (each runs its own prefill windows and decodes), so a macro instance's share of
  requests should follow its size;
- routers make this choice (DESIGN.md §2) and see only the macro-instance table, not the per-window TTFT
  budgets that live in each macro instance's coordinator; sizes are all this rule needs, and routers that
  each run it independently still add up to the same proportions;
- within a macro instance the admission check already adapts to load, so the top level need not;
- the smooth variant interleaves (6:3 gives a b a a b a a b a, not six a's then three b's), so no macro
  instance gets a burst; and it is deterministic, so tests and the simulator replay exactly.

`most_ttft_budget` is the alternative for a caller that knows every macro instance's budget (a single
coordinator, or the simulator): the macro instance whose activated instance has the most TTFT budget left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class MacroLoad:
    macro_id: str
    ready_members: int
    ttft_budget_left: float | None = None  # seconds (MacroInstanceDispatcher.ttft_budget_left); None: unknown


class MacroChoice(Protocol):
    name: str

    def choose(self, macros: Sequence[MacroLoad]) -> str | None:
        """The macro instance for the next request; None when none has a ready member."""
        ...


class SizeWeightedRoundRobin:
    """nginx's smooth weighted round-robin: every pick adds each weight to its macro instance's credit, takes
    the highest credit (the first listed on a tie), and charges it the total weight."""

    name = "size_weighted"

    def __init__(self) -> None:
        self._credit: dict[str, int] = {}

    def choose(self, macros: Sequence[MacroLoad]) -> str | None:
        live = [m for m in macros if m.ready_members > 0]
        if not live:
            return None
        # Macro instances that vanished lose their credit; new ones start from zero.
        credit = {m.macro_id: self._credit.get(m.macro_id, 0) + m.ready_members for m in live}
        best = max(live, key=lambda m: credit[m.macro_id])  # max keeps the first of equals
        credit[best.macro_id] -= sum(m.ready_members for m in live)
        self._credit = credit
        return best.macro_id


class MostTtftBudget:
    """The macro instance with the most TTFT budget left; unknown budgets rank last (no evidence of room),
    ties go to the larger, then to the first listed."""

    name = "most_ttft_budget"

    def choose(self, macros: Sequence[MacroLoad]) -> str | None:
        live = [m for m in macros if m.ready_members > 0]
        if not live:
            return None
        best = max(
            live,
            key=lambda m: (m.ttft_budget_left is not None, m.ttft_budget_left or 0.0, m.ready_members),
        )
        return best.macro_id


CHOICES: dict[str, Callable[[], MacroChoice]] = {
    SizeWeightedRoundRobin.name: SizeWeightedRoundRobin,
    MostTtftBudget.name: MostTtftBudget,
}


def make_choice(name: str) -> MacroChoice:
    """The choice registered under `name` (KeyError names the known ones)."""
    try:
        factory = CHOICES[name]
    except KeyError:
        raise KeyError(
            f"unknown macro-instance choice {name!r} (known: {', '.join(sorted(CHOICES))})"
        ) from None
    return factory()
