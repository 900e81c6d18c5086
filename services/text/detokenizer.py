"""Incremental detokenization with stop strings, for the offline driver and the streaming router.

Algorithm: vLLM's prefix-offset/read-offset window, but over token ids and decoded by the tokenizer's own
`decode` (the Rust one for fast tokenizers), not by `convert_ids_to_tokens` + `convert_tokens_to_string`.
Each step decodes only the window `ids[prefix_offset:]`, the last emitted chunk plus the tokens since, so
a step costs the same at token 10 as at token 10,000 (SmolLM2 tokenizer, one token per push: ~2.7 µs per
token, ~3.1 µs with three stop strings, flat from 500 to 6,500 tokens; re-decoding 4,000 tokens costs
~730 µs). The new text is the window's decode minus the decode of its first part (`prefix_text`). A
trailing run of U+FFFD may be a character whose remaining bytes are still to come, so only that run is
held until a later token completes it (or `flush` ends the stream); the text before it goes out at once.

Why not `tokenizers.decoders.DecodeStream`: it runs the same window algorithm in Rust (~0.6 µs/token),
but its state is opaque, so it cannot release held-back bytes at the end of a generation (`flush`), emit
the text before an incomplete character, or say which token of a chunk completed a stop string; the ~2 µs
it saves is noise next to a model step. Why not token strings: the decoder alone mishandles added tokens
whose text is not in the byte alphabet, and costs ~4x more.

Stop strings are matched on the decoded text stream. Text that ends in a proper prefix of some stop
string is held back; the first stop string to complete (earliest end; on a tie, earliest start) ends the
stream, with the text cut where it starts (or where it ends, with `include_stop_str_in_output`). Chunks
are processed one token at a time, so the result does not depend on how tokens were grouped into pushes.

This module must not import torch or transformers: the router process stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decode context: enough for any leading-space rule (vLLM keeps 5), and few enough
# that the first step stays cheap.
_CONTEXT_TOKENS = 6


@dataclass(frozen=True, slots=True)
class DetokenizerDelta:
    text: str  # new text, safe to show now
    stop_string: str | None = None  # the stop string that ended the stream in this push, if any


class IncrementalDetokenizer:
    """Turns generated token ids into text, one push at a time.

    With no stop string, `"".join(push(...).text for ...) + flush()` equals `tokenizer.decode(output_ids,
    skip_special_tokens=...)` for byte-level tokenizers, with or without a prompt, whatever the bytes, with
    one exception: a character whose bytes straddle the prompt/output boundary is shown whole (decode of the
    output alone shows U+FFFD for its stray bytes; vLLM drops it). For SentencePiece-style ones, prompt
    context makes the first token keep its leading space (the text is what follows the prompt's text, as
    vLLM gives it; pass no prompt to get plain `decode(output_ids)`), and equality holds while the <0xNN>
    byte-fallback runs are valid UTF-8: `decode` turns every byte of an invalid run into U+FFFD, complete
    characters included, which a stream that has already shown them cannot match; it shows one U+FFFD per
    stray byte instead.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self._decode = _window_decoder(tokenizer, skip_special_tokens)
        context = [int(t) for t in prompt_token_ids[-_CONTEXT_TOKENS:]] if len(prompt_token_ids) else []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context) if context else ""
        self._window_emitted = 0  # characters of the open window's new text already emitted
        # An empty stop string would match before any text; the API layer rejects it, so just drop it.
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._partials = _partial_stop_table(self._stops)
        self._include_stop = include_stop_str_in_output
        self._held = ""  # decoded text that may be the start of a stop string
        self._pieces: list[str] = []
        self._stop_string: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        """All text emitted so far (by push and flush)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def token_ids(self) -> list[int]:
        """The output tokens consumed: after a stop string, up to the token that completed it."""
        return self._ids[self._num_context :]

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    @property
    def finished(self) -> bool:
        return self._stop_string is not None or self._flushed

    def push(self, token_ids: Sequence[int]) -> DetokenizerDelta:
        """Add generated tokens; return the text that became safe to show. After a stop string has
        matched, pushes are ignored (tokens already in flight from the engine are expected)."""
        if self._flushed:
            raise RuntimeError("push() after flush(): the generation has ended")
        if self._stop_string is not None:
            return DetokenizerDelta("")
        out: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            text, stop = self._filter(self._step())
            if text:
                out.append(text)
            if stop is not None:
                self._stop_string = stop
                break
        delta = "".join(out)
        if delta:
            self._pieces.append(delta)
        return DetokenizerDelta(delta, self._stop_string)

    def flush(self) -> str:
        """End of generation: return the text still held back (a possible stop-string start, and trailing
        bytes of an incomplete character, decoded as `tokenizer.decode` would). A stop string completed by
        that tail still cuts it, and sets `stop_string`."""
        if self._flushed or self._stop_string is not None:
            self._flushed = True
            return ""
        self._flushed = True
        new = self._new_text(self._decode(self._ids[self._prefix_offset :]))
        tail = self._held + new[self._window_emitted :]
        self._held = ""
        hit = self._find_stop(tail)
        if hit is not None:
            tail, self._stop_string = self._cut(tail, *hit), hit[1]
        if tail:
            self._pieces.append(tail)
        return tail

    def _step(self) -> str:
        """Decode the window after one appended token; return the newly settled text."""
        text = self._decode(self._ids[self._prefix_offset :])
        new = self._new_text(text)
        if text.endswith(_REPLACEMENT):
            # Only the trailing U+FFFD run can still change (bytes of a character still arriving); what
            # precedes it is final, so emit it now but keep the window open.
            settled = new.rstrip(_REPLACEMENT)
            fresh = settled[self._window_emitted :]
            self._window_emitted = max(self._window_emitted, len(settled))
            return fresh
        if not new:
            # e.g. a skipped special token: keep the window, whose text gives the next token its context
            return ""
        fresh = new[self._window_emitted :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._window_emitted = 0
        return fresh

    def _new_text(self, text: str) -> str:
        """The part of the window's text that the tokens after the prefix window add."""
        prefix = self._prefix_text
        if text.startswith(prefix):
            return text[len(prefix) :]
        if prefix.endswith(_REPLACEMENT):
            # The prompt context ended inside a character, which `text` now completes: emit from where
            # the two first differ, so the character shows whole.
            pairs = zip(text, prefix, strict=False)
            return text[next((i for i, (a, b) in enumerate(pairs) if a != b), len(prefix)) :]
        # The decoder rewrote settled text: ByteFallback turns a whole run of <0xNN> tokens into one U+FFFD
        # per byte once the run stops being valid UTF-8, characters already shown included. Those cannot be
        # taken back, so show what the new tokens decode to on their own.
        return self._decode(self._ids[self._read_offset :])

    def _filter(self, new: str) -> tuple[str, str | None]:
        """Apply stop strings to newly settled text: (text to emit, matched stop string or None)."""
        if not self._stops:
            return new, None
        if not new:
            return "", None
        # Earlier text holds no complete stop string and `_held` is its longest suffix that could start
        # one, so any match must lie inside `buf`.
        buf = self._held + new
        hit = self._find_stop(buf)
        if hit is not None:
            self._held = ""
            return self._cut(buf, *hit), hit[1]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence that completes first; on a tie the earliest start."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _cut(self, buf: str, start: int, stop: str) -> str:
        return buf[: start + len(stop)] if self._include_stop else buf[:start]

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        size = len(buf)
        for length, stop in self._partials.get(buf[-1], ()):
            if length <= size and buf.startswith(stop[:length], size - length):
                return length
        return 0


def _window_decoder(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> Callable[[list[int]], str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # The Rust decode that `tokenizer.decode` wraps, without its per-call Python overhead.
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)
    # Python tokenizers, or ones that post-process decoded text: their own decode applies the same rules.
    return partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)


def _partial_stop_table(stops: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """The proper prefixes of the stop strings as (length, stop string), keyed by their last character and
    longest first, so the hold-back check after each token tests only prefixes that can end the text. Linear
    in the stops' total length (the prefixes themselves would be quadratic)."""
    table: dict[str, list[tuple[int, str]]] = {}
    for stop in stops:
        for end in range(1, len(stop)):
            table.setdefault(stop[end - 1], []).append((end, stop))
    for entries in table.values():
        entries.sort(key=lambda entry: entry[0], reverse=True)
    return table
