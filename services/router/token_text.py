"""Per-token strings and bytes for OpenAI logprobs.

A token can hold part of a UTF-8 character, so its decoded string may be U+FFFD while its bytes are the real
ones; OpenAI's chat logprobs carry `bytes` for exactly this. Byte-level BPE tokens (GPT-2, Llama 3, Qwen,
SmolLM2) map back to bytes through the GPT-2 byte alphabet; SentencePiece-style ones (Llama 2, Mistral) are
`<0xNN>` byte-fallback tokens or pieces whose `▁` is a space; anything else is its decoded text.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CACHE_SIZE = 65536


def _gpt2_unicode_to_bytes() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to 256+."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


_METASPACE = "\u2581"  # "▁", SentencePiece's visible space


def _decoder_parts(tokenizer: PreTrainedTokenizerBase) -> list[dict[str, object]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return [part for part in parts if isinstance(part, dict)]


def _uses_metaspace(parts: list[dict[str, object]]) -> bool:
    return any(
        part.get("type") == "Metaspace"
        or (part.get("type") == "Replace" and part.get("pattern") == {"String": _METASPACE})
        for part in parts
    )


class TokenText:
    """Cached `text(id)` (what the token decodes to alone) and `bytes(id)` (its raw bytes)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        parts = _decoder_parts(tokenizer)
        byte_level = any(part.get("type") == "ByteLevel" for part in parts)
        self._byte_table = _gpt2_unicode_to_bytes() if byte_level else None
        self._metaspace = _uses_metaspace(parts)
        special = getattr(tokenizer, "all_special_ids", None) or []
        self._special = frozenset(special)
        self.text = lru_cache(maxsize=_CACHE_SIZE)(self._text)
        self.bytes = lru_cache(maxsize=_CACHE_SIZE)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> tuple[int, ...]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._special:
            if self._byte_table is not None and all(char in self._byte_table for char in piece):
                return tuple(self._byte_table[char] for char in piece)
            match = _BYTE_FALLBACK.fullmatch(piece)
            if match is not None:
                return (int(match.group(1), 16),)
            if self._metaspace:
                return tuple(piece.replace(_METASPACE, " ").encode("utf-8"))
        return tuple(self.text(token_id).encode("utf-8"))
