"""The paged KV pool: per layer, K and V tensors of `[num_blocks, block_size, kv_heads, head_dim]`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config, dtype: torch.dtype) -> KVGeometry:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype)

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def blocks_for_budget(self, budget_bytes: int, block_size: int) -> int:
        return budget_bytes // (self.bytes_per_token() * block_size)


class KVCache:
    def __init__(self, geometry: KVGeometry, num_blocks: int, block_size: int, device: torch.device | str):
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, geometry.num_kv_heads, geometry.head_dim)
        # empty, not zeros: attention reads only slots it wrote, and untouched pages of a large budget are
        # never faulted in, so start-up is instant and RSS grows with what is actually used.
        self.k = [torch.empty(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.num_layers)]
        self.v = [torch.empty(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.num_layers)]

    @property
    def num_bytes(self) -> int:
        return self.geometry.bytes_per_token() * self.num_blocks * self.block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]
