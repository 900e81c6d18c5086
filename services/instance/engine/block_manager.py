"""Free-list allocator of fixed-size KV blocks and the per-sequence block tables.

Pure Python: the scheduler asks it what fits before anything touches a tensor. Every block returns on
finish, abort and preemption; `num_free_blocks == num_blocks` when the engine is idle.
"""

from __future__ import annotations

from collections import deque

from services.instance.engine.sequence import Sequence


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}×{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must add so that `num_new_tokens` more tokens have KV slots."""
        total = blocks_for_tokens(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block table to hold its computed tokens plus `num_new_tokens`."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"{seq.request_id}: needs {needed} blocks, {len(self._free)} free")
        for _ in range(needed):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        # Recently freed blocks go to the back so a block is reused as late as possible (cache-warm reuse
        # does not matter on CPU; predictability in tests does).
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat slot index of token `position` of `seq` in a `[num_blocks * block_size]` pool view."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
