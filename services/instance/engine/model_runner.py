"""Turns a scheduled step into one packed forward of the transformers model, and returns the logits of
the chunks that sample a token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.instance.engine.attention import ATTENTION_NAME, META_KWARG, PagedMetadata, PrefillSpan
from services.instance.engine.kv_cache import KVCache
from services.instance.engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass
class StepResult:
    sampling_chunks: list[ScheduledChunk]  # row i of `logits` belongs to sampling_chunks[i]
    logits: torch.Tensor  # [len(sampling_chunks), vocab], float32


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache):
        impl = getattr(model.config, "_attn_implementation", None)
        if impl != ATTENTION_NAME:
            # Any other backend would silently ignore the paged metadata and the KV pool.
            raise ValueError(
                f"model must be loaded with attn_implementation={ATTENTION_NAME!r}, got {impl!r}"
            )
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> StepResult:
        # One-token chunks first: the attention backend batches them through the paged decode kernel.
        chunks = sorted(step.chunks, key=lambda c: c.num_tokens != 1)
        meta, input_ids, positions, sample_rows, sampling = self._prepare(chunks)
        out = self.model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=sample_rows,
            **{META_KWARG: meta},
        )
        return StepResult(sampling, out.logits[0].float())

    def _prepare(self, chunks: list[ScheduledChunk]):
        bs = self.block_size
        device = self.device
        dec_ids: list[int] = []
        dec_pos: list[int] = []
        dec_slots: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        pre_ids: list[torch.Tensor] = []
        pre_pos: list[torch.Tensor] = []
        pre_slots: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledChunk] = []

        num_decodes = 0
        for c in chunks:
            if c.num_tokens != 1:
                break
            seq = c.seq
            dec_ids.append(seq.token_slice(c.start, c.end)[0])
            dec_pos.append(c.start)
            dec_slots.append(seq.block_table[c.start // bs] * bs + c.start % bs)
            dec_tables.append(seq.block_table)
            dec_lens.append(c.end)
            if c.samples:
                sample_rows.append(num_decodes)
                sampling.append(c)
            num_decodes += 1

        row = num_decodes
        for c in chunks[num_decodes:]:
            seq = c.seq
            table = torch.tensor(seq.block_table, dtype=torch.long)
            kv_pos = torch.arange(c.end, dtype=torch.long)
            kv_slots = table[kv_pos // bs] * bs + kv_pos % bs
            pre_ids.append(torch.tensor(seq.token_slice(c.start, c.end), dtype=torch.long))
            pre_pos.append(kv_pos[c.start :])
            pre_slots.append(kv_slots[c.start :])
            prefills.append(
                PrefillSpan(row, c.num_tokens, c.end, kv_slots.to(device) if c.start > 0 else None)
            )
            row += c.num_tokens
            if c.samples:
                sample_rows.append(row - 1)
                sampling.append(c)

        input_ids = torch.cat([torch.tensor(dec_ids, dtype=torch.long), *pre_ids])
        positions = torch.cat([torch.tensor(dec_pos, dtype=torch.long), *pre_pos])
        slots = torch.cat([torch.tensor(dec_slots, dtype=torch.long), *pre_slots])
        width = max((len(t) for t in dec_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.int32)
        tables = tables.view(num_decodes, width)
        meta = PagedMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=slots.to(device),
            num_decodes=num_decodes,
            decode_block_tables=tables.to(device),
            decode_context_lens=torch.tensor(dec_lens, dtype=torch.int32).to(device),
            prefills=prefills,
        )
        return (
            meta,
            input_ids.to(device),
            positions.to(device),
            torch.tensor(sample_rows, dtype=torch.long, device=device),
            sampling,
        )
