"""FuDG (DistServe-style full disaggregation) dispatch: a prefill instance and a decode instance per request.

Pure: no I/O, no clock, no state between calls. The prefill instance is the ready one with the least
outstanding prefill work (prompt tokens dispatched to it and not prefilled yet); the decode instance is the
ready one least loaded by KV (share of its blocks used or promised) among those with room for the request's
KV. Ties go to fewer requests, then to the smallest id, so a restarted coordinator chooses the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from services.coordinator.dispatch import Overloaded, Unavailable
from services.coordinator.inflight import InflightTracker
from services.coordinator.registry import InstanceRecord
from shared.messages import FudgRole, InstanceInfo, InstanceStatus

Role = FudgRole


@dataclass(frozen=True, slots=True)
class PrefillCandidate:
    instance_id: str
    ready: bool
    queued_prompt_tokens: int  # dispatched here and not prefilled yet (reported or not)
    queued_requests: int


@dataclass(frozen=True, slots=True)
class DecodeCandidate:
    instance_id: str
    ready: bool
    kv_blocks_free: int
    kv_blocks_total: int
    block_size: int
    num_running: int
    # Blocks of requests already routed here whose KV has not shown up in a status report yet: without them a
    # burst between two reports would all land on the same instance.
    promised_blocks: int = 0

    @property
    def available_blocks(self) -> int:
        return self.kv_blocks_free - self.promised_blocks

    @property
    def kv_load(self) -> float:
        used = self.kv_blocks_total - self.available_blocks
        return used / self.kv_blocks_total if self.kv_blocks_total else 1.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class FudgDispatch:
    prefill_instance_id: str
    decode_instance_id: str


FudgDecision = FudgDispatch | Unavailable | Overloaded


def choose_fudg(
    prefills: Sequence[PrefillCandidate],
    decodes: Sequence[DecodeCandidate],
    *,
    prompt_tokens: int,
    max_waiting_per_instance: int,
    retry_after: float = 1.0,
) -> FudgDecision:
    """The pair for a request of `prompt_tokens`; Unavailable when a role has no ready instance (503),
    Overloaded when every prefill queue is full or no decode instance has room for the KV (429)."""
    ready_p = [c for c in prefills if c.ready]
    ready_d = [c for c in decodes if c.ready]
    if not ready_p or not ready_d:
        missing = "prefill" if not ready_p else "decode"
        return Unavailable(f"no ready {missing} instance", retry_after)
    open_p = [c for c in ready_p if c.queued_requests < max_waiting_per_instance]
    if not open_p:
        return Overloaded(
            f"all {len(ready_p)} prefill instances have {max_waiting_per_instance} or more queued requests",
            retry_after,
        )
    # The KV of the prompt plus the first token's slot must fit where decoding continues.
    roomy = [c for c in ready_d if c.blocks_for(prompt_tokens + 1) <= c.available_blocks]
    if not roomy:
        return Overloaded(f"no decode instance has room for the KV of {prompt_tokens} tokens", retry_after)
    prefill = min(open_p, key=lambda c: (c.queued_prompt_tokens, c.queued_requests, c.instance_id))
    decode = min(roomy, key=lambda c: (c.kv_load, c.num_running, c.instance_id))
    return FudgDispatch(prefill.instance_id, decode.instance_id)


def prefill_candidate(
    instance_id: str, ready: bool, status: InstanceStatus | None, pending_prompt_tokens: Iterable[int]
) -> PrefillCandidate:
    """From the latest status (requests without a first token are still to prefill) and the prompt sizes of
    dispatches the status does not list yet."""
    pending = list(pending_prompt_tokens)
    queued = [r for r in status.requests if r.first_token_time is None] if status else []
    return PrefillCandidate(
        instance_id=instance_id,
        ready=ready,
        queued_prompt_tokens=sum(r.prompt_tokens for r in queued) + sum(pending),
        queued_requests=len(queued) + len(pending),
    )


def decode_candidate(
    instance_id: str,
    ready: bool,
    status: InstanceStatus | None,
    *,
    kv_blocks_total: int,
    block_size: int,
    promised_tokens: Iterable[int] = (),
) -> DecodeCandidate:
    """From the latest status and the prompt sizes of requests routed here that it does not list yet."""
    promised = sum(-(-(n + 1) // block_size) for n in promised_tokens)
    return DecodeCandidate(
        instance_id=instance_id,
        ready=ready,
        kv_blocks_free=status.kv_blocks_free if status else kv_blocks_total,
        kv_blocks_total=kv_blocks_total,
        block_size=block_size,
        num_running=status.num_running if status else 0,
        promised_blocks=promised,
    )


def choose_for_records(
    records: Iterable[InstanceRecord],
    inflight: InflightTracker,
    role_of: Callable[[InstanceInfo], Role],
    *,
    prompt_tokens: int,
    max_waiting_per_instance: int,
    retry_after: float = 1.0,
) -> FudgDecision:
    """`choose_fudg` over a macro instance's registry records. Dispatched requests the instance has not
    listed yet (InflightTracker entries not `listed`) count as its queued prompt tokens (prefill) or its
    promised KV (decode): the coordinator records a FuDG request under both instances it chose."""
    prefills: list[PrefillCandidate] = []
    decodes: list[DecodeCandidate] = []
    for record in records:
        unlisted = [e.prompt_tokens for e in inflight.of(record.instance_id) if not e.listed]
        role = role_of(record.info)
        if role == "prefill":
            prefills.append(
                prefill_candidate(record.instance_id, record.dispatchable, record.status, unlisted)
            )
        elif role == "decode":
            decodes.append(
                decode_candidate(
                    record.instance_id,
                    record.dispatchable,
                    record.status,
                    kv_blocks_total=record.info.kv_blocks_total,
                    block_size=record.info.block_size,
                    promised_tokens=unlisted,
                )
            )
    return choose_fudg(
        prefills,
        decodes,
        prompt_tokens=prompt_tokens,
        max_waiting_per_instance=max_waiting_per_instance,
        retry_after=retry_after,
    )
