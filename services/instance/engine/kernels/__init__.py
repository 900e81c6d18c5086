"""Attention kernels for the paged KV pool, native (C, built on first use) with torch fallbacks."""

from services.instance.engine.kernels.paged_decode import (
    native_available,
    paged_decode_attention,
    paged_decode_attention_torch,
)

__all__ = ["native_available", "paged_decode_attention", "paged_decode_attention_torch"]
