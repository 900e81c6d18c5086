"""The scheduler: queues of sequences, a swappable policy that picks each step's work, and the bookkeeping
after a step (append sampled tokens, stop checks, freeing blocks).

Pure Python with no I/O and no clock: `now` is always an argument, so the same code runs in the instance
service, in unit tests and in a simulator.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from services.instance.engine.block_manager import BlockManager
from services.instance.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    # Tokens fed to the model in one step: whole prompts for `nodg`, the chunk budget for `sarathi`.
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, from position `start`, computed in one step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so the step samples its next token."""
        return self.end == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for c in self.chunks if c.seq.is_decoding)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens


class Policy(Protocol):
    """Chooses one step's chunks. Implementations live in `policies.py`."""

    name: str

    def schedule(self, scheduler: Scheduler, now: float) -> SchedulerOutput: ...


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: Policy):
        config.validate()
        self.config = config
        self.blocks = block_manager
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queues ---------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def abort(self, request_id: str, now: float) -> Sequence | None:
        seq = self.find(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT, now)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason, now: float, stop_reason: int | str | None = None):
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.finished_time = now

    # -- step -----------------------------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        out = self.policy.schedule(self, now)
        for chunk in out.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now
        return out

    def postprocess(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Sequence]:
        """Advance computed counts, append sampled tokens (by request id), and finish what stops.

        Returns the sequences that received a token this step, in chunk order.
        """
        touched: list[Sequence] = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted between schedule and postprocess
                continue
            seq.num_computed_tokens = chunk.end
            if not chunk.samples:
                continue
            token = sampled[seq.request_id]
            seq.output_token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            touched.append(seq)
            reason, stop_reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason, now, stop_reason)
            elif seq.export_kv:
                self._detach(seq, now)
        return touched

    def _detach(self, seq: Sequence, now: float) -> None:
        """Take `seq` out of the queues but keep its blocks: the engine exports its KV, then frees them."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.TRANSFERRED
        seq.finished_time = now

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[FinishReason | None, int | None]:
        params = seq.params
        if seq.num_output_tokens > params.min_tokens or params.min_tokens == 0:
            if not params.ignore_eos and token in seq.eos_token_ids:
                return FinishReason.STOP, None
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    # -- building blocks for policies -----------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Drop `seq`'s KV (recompute later) and put it at the head of the waiting queue."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def reserve(
        self, seq: Sequence, num_tokens: int, out: SchedulerOutput, protected: Iterable[Sequence]
    ) -> bool:
        """Allocate blocks for `num_tokens` more tokens of running `seq`, preempting the newest running
        sequences not in `protected` when blocks run out. False when `seq` itself had to be preempted."""
        protected_ids = {id(s) for s in protected}
        while not self.blocks.can_allocate(self.blocks.blocks_needed(seq, num_tokens)):
            victim = next((s for s in reversed(self.running) if id(s) not in protected_ids), None)
            if victim is None or victim is seq:
                self.preempt(seq)
                out.preempted.append(seq)
                return False
            self.preempt(victim)
            out.preempted.append(victim)
        self.blocks.allocate(seq, num_tokens)
        return True

    def schedule_decodes(self, out: SchedulerOutput, budget: int) -> int:
        """One token for each decoding sequence, oldest first, within `budget`; returns tokens used."""
        used = 0
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if used >= budget:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            if not self.reserve(seq, 1, out, scheduled):
                continue
            scheduled.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
            used += 1
        return used

    def schedule_prefills(self, out: SchedulerOutput, budget: int, *, chunked: bool) -> int:
        """Prefill work within `budget` tokens: partially prefilled running sequences first, then waiting
        ones in arrival order. Without `chunked`, a prompt is taken whole or not at all, except a prompt
        larger than the whole step budget, which is split so it can run at all."""
        used = 0
        protected = [c.seq for c in out.chunks]
        for seq in [s for s in self.running if not s.is_decoding]:
            if used >= budget:
                return used
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted while reserving for an earlier one
            n = min(seq.num_uncomputed_tokens, budget - used)
            if not chunked and n < seq.num_uncomputed_tokens and used > 0:
                break
            if not self.reserve(seq, n, out, protected):
                continue
            protected.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            used += n
        while self.waiting and used < budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            want = seq.num_uncomputed_tokens
            n = min(want, budget - used)
            if n < want and not chunked and (used > 0 or want <= self.config.max_num_batched_tokens):
                break
            # Admitting a prompt never preempts running work: wait until its step's tokens fit. (With
            # nothing running the whole pool is free, and the engine caps max_model_len to the pool.)
            if n > self._tokens_that_fit(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            used += n
        return used

    def _tokens_that_fit(self, seq: Sequence) -> int:
        in_last_block = len(seq.block_table) * self.blocks.block_size - seq.num_computed_tokens
        return in_last_block + self.blocks.num_free_blocks * self.blocks.block_size
