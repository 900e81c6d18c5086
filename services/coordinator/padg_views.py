"""What the PaDG dispatcher knows about one member instance: its last status report, the requests it sent
there that the reports do not show as prefilled yet, and its prefill window while it is the activated
(prefill) instance. Pure: no I/O, no clock; times are unix seconds, the clock of RequestProgress.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.coordinator.prefill_model import PrefillModel
from services.coordinator.registry import PENDING_REPORTS
from shared.messages import InstanceStatus, RequestProgress


def prompt_blocks(prompt_tokens: int, block_size: int) -> int:
    """KV blocks a prompt needs once prefilled, counting the first generated token: ceil((n+1)/block_size).
    The authors' (n+16)//16 is the same number for block size 16. No reservation for later output."""
    return -(-(prompt_tokens + 1) // block_size)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request the dispatcher sent to an instance, priced for that instance."""

    request_id: str
    prompt_tokens: int
    arrival_time: float
    admitted_at: float
    prefill_time: float  # predicted seconds on this instance
    kv_blocks: int


@dataclass(frozen=True, slots=True)
class Window:
    """The prefill window of the activated instance: when it opened (the authors' `schedule_time`) and what
    was admitted since, in order."""

    opened_at: float
    admitted: tuple[Admitted, ...] = ()

    @property
    def prefill_time(self) -> float:
        return sum(a.prefill_time for a in self.admitted)

    @property
    def kv_blocks(self) -> int:
        return sum(a.kv_blocks for a in self.admitted)

    @property
    def request_ids(self) -> frozenset[str]:
        return frozenset(a.request_id for a in self.admitted)

    def plus(self, admitted: Admitted) -> Window:
        return Window(self.opened_at, (*self.admitted, admitted))


@dataclass(frozen=True, slots=True)
class HeldRequest:
    """A request on an instance as the dispatcher last knew it (reported, or sent and not reported yet)."""

    request_id: str
    prompt_tokens: int
    arrival_time: float
    output_tokens: int
    first_token_time: float | None  # None until prefilled
    prefill_time: float
    kv_blocks: int

    def saved_tpot(self, tpot_slo: float, at: float) -> float:
        """The paper's decode slack: how far ahead of the TPOT SLO its decoding is at `at` (seconds), i.e.
        how long a prefill may pause it. Only meaningful once prefilled."""
        assert self.first_token_time is not None
        return self.output_tokens * tpot_slo - (at - self.first_token_time)


@dataclass(frozen=True, slots=True)
class StatusDelta:
    """What one status report changed: requests that ended, and time-to-first-token of the requests seen
    getting their first token (the mitosis expansion signal). TTFTs are only reported for requests this
    dispatcher sent or saw waiting, so a coordinator that just took over does not replay old ones."""

    finished: tuple[str, ...] = ()
    ttfts: tuple[tuple[str, float], ...] = ()


@dataclass
class _Outstanding:
    admitted: Admitted
    listed: bool = False
    misses: int = 0


@dataclass
class InstanceView:
    instance_id: str
    block_size: int
    kv_blocks_total: int
    prefill_model: PrefillModel
    ready: bool = True  # the caller's say (admin state, confirmed after a coordinator takeover)
    reported_ready: bool = True  # the instance's own say, from its last report
    has_status: bool = False
    kv_blocks_free: int = 0
    window: Window | None = None  # set only while this is the activated instance
    requests: dict[str, RequestProgress] = field(default_factory=dict)  # from the last report
    _outstanding: dict[str, _Outstanding] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"{self.instance_id}: block size must be at least 1, got {self.block_size}")
        if not self.has_status:
            # Nothing reported yet: a freshly registered instance is empty.
            self.kv_blocks_free = self.kv_blocks_total

    @property
    def eligible(self) -> bool:
        return self.ready and self.reported_ready

    def price(self, request_id: str, prompt_tokens: int, arrival_time: float, now: float) -> Admitted:
        return Admitted(
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            arrival_time=arrival_time,
            admitted_at=now,
            prefill_time=self.prefill_model.predict(prompt_tokens),
            kv_blocks=prompt_blocks(prompt_tokens, self.block_size),
        )

    # ---- dispatcher bookkeeping ----

    def admit(self, admitted: Admitted) -> None:
        assert self.window is not None, "requests are admitted only into an open prefill window"
        self.window = self.window.plus(admitted)
        self._outstanding[admitted.request_id] = _Outstanding(admitted)

    def cancel(self, request_id: str) -> bool:
        """Forget a request the instance did not take; True if it was known."""
        known = self._outstanding.pop(request_id, None) is not None
        if self.window is not None and request_id in self.window.request_ids:
            kept = tuple(a for a in self.window.admitted if a.request_id != request_id)
            self.window = Window(self.window.opened_at, kept)
            known = True
        return known

    # ---- status reports ----

    def observe(self, status: InstanceStatus) -> StatusDelta:
        listed = {progress.request_id: progress for progress in status.requests}
        finished = tuple(request_id for request_id in self.requests if request_id not in listed)
        ttfts: list[tuple[str, float]] = []
        for request_id, progress in listed.items():
            if progress.first_token_time is None:
                continue
            before = self.requests.get(request_id)
            newly = before.first_token_time is None if before else request_id in self._outstanding
            if newly:
                ttfts.append((request_id, progress.first_token_time - progress.arrival_time))
        for request_id, entry in list(self._outstanding.items()):
            progress = listed.get(request_id)
            if progress is not None:
                entry.listed, entry.misses = True, 0
                if progress.first_token_time is not None:  # prefilled: its KV is in kv_blocks_free now
                    del self._outstanding[request_id]
                continue
            entry.misses += 1
            # Listed before and gone now: ended. Never listed: it ended between two reports.
            if entry.listed or entry.misses >= PENDING_REPORTS:
                del self._outstanding[request_id]
        self.requests = listed
        self.kv_blocks_free = status.kv_blocks_free
        self.reported_ready = status.state == "ready"
        self.has_status = True
        return StatusDelta(finished=finished, ttfts=tuple(ttfts))

    # ---- queries ----

    def held(self) -> list[HeldRequest]:
        """Every request on the instance: the reported ones, then the sent-but-unreported ones."""
        held = []
        for progress in self.requests.values():
            entry = self._outstanding.get(progress.request_id)
            held.append(
                HeldRequest(
                    request_id=progress.request_id,
                    prompt_tokens=progress.prompt_tokens,
                    arrival_time=progress.arrival_time,
                    output_tokens=progress.output_tokens,
                    first_token_time=progress.first_token_time,
                    # The price it was admitted at, so window sums and carry-overs agree.
                    prefill_time=entry.admitted.prefill_time
                    if entry
                    else self.prefill_model.predict(max(progress.prompt_tokens, 1)),
                    kv_blocks=prompt_blocks(progress.prompt_tokens, self.block_size),
                )
            )
        for request_id, entry in self._outstanding.items():
            if request_id in self.requests:
                continue
            a = entry.admitted
            held.append(
                HeldRequest(
                    request_id=a.request_id,
                    prompt_tokens=a.prompt_tokens,
                    arrival_time=a.arrival_time,
                    output_tokens=0,
                    first_token_time=None,
                    prefill_time=a.prefill_time,
                    kv_blocks=a.kv_blocks,
                )
            )
        return held

    def mean_saved_tpot(
        self, tpot_slo: float, at: float, exclude: frozenset[str] = frozenset()
    ) -> float | None:
        """Mean decode slack of the prefilled requests (not in `exclude`); None when nothing decodes."""
        slacks = [
            h.saved_tpot(tpot_slo, at)
            for h in self.held()
            if h.first_token_time is not None and h.request_id not in exclude
        ]
        return sum(slacks) / len(slacks) if slacks else None
