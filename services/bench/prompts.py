"""Prompts made to measure: a request of `input_len` prompt tokens becomes token ids or text.

Token ids (the default for /v1/completions, which accepts `prompt` as a list of ints) give exact lengths with
no tokenizer at all: ids are drawn uniformly from an id range that every real vocabulary contains, so the same
benchmark runs against any server. With `--tokenizer DIR` the ids come from that tokenizer's ordinary
vocabulary (special tokens excluded) instead.

Text (needed for /v1/chat/completions, or with `--prompt-mode text`): with a tokenizer, random ids are decoded
and the text re-encoded, trimming or extending until it tokenizes to exactly `input_len` (as vLLM's random
dataset does); without one, `input_len` common English words, about one token each in BPE vocabularies — an
approximation, so the report takes prompt lengths from the server's usage numbers. For chat the template adds
its own tokens on top.

Each request's prompt is seeded by (seed, request index), so the same request gets the same prompt in every
run, and random tokens make prefix caching irrelevant.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from services.bench.workloads import Prompt, RequestSpec

PromptMode = Literal["ids", "text"]

# Ids above the specials and byte tokens most vocabularies start with, below any real vocabulary's size.
DEFAULT_ID_RANGE = (100, 4000)
TEXT_FIT_ATTEMPTS = 16

# Common English words, each about one token (with its leading space) in BPE vocabularies.
_COMMON_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their can has more when will would if so no said what its up out "
    "into them time some could these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three"
)
WORDS = tuple(_COMMON_WORDS.split())


class PromptMaker:
    def __init__(
        self,
        mode: PromptMode,
        *,
        seed: int = 0,
        tokenizer: Any | None = None,
        id_range: tuple[int, int] = DEFAULT_ID_RANGE,
    ):
        self.mode = mode
        self.seed = seed
        self.tokenizer = tokenizer
        if tokenizer is not None:
            special = set(tokenizer.all_special_ids)
            self.vocab = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
        else:
            low, high = id_range
            if not 0 <= low < high:
                raise ValueError(f"token id range must satisfy 0 <= low < high, got {low}..{high}")
            self.vocab = np.arange(low, high, dtype=np.int64)

    def make(self, index: int, spec: RequestSpec) -> tuple[Prompt, int | None]:
        """The prompt for request `index`, and its length in tokens when known."""
        if spec.prompt is not None:
            if isinstance(spec.prompt, str) or self.mode == "ids":
                return spec.prompt, spec.input_len
            return self._decode(spec.prompt), None  # a token-id line sent to the chat API needs text
        assert spec.input_len is not None
        rng = np.random.default_rng([self.seed, index, 0x9])
        if self.mode == "ids":
            return [int(t) for t in rng.choice(self.vocab, spec.input_len)], spec.input_len
        if self.tokenizer is None:
            return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), spec.input_len)), None
        return self._fit_text(rng, spec.input_len)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("a token-id prompt sent as text needs --tokenizer")
        return self.tokenizer.decode(ids)

    def _fit_text(self, rng: np.random.Generator, target: int) -> tuple[str, int]:
        ids = [int(t) for t in rng.choice(self.vocab, target)]
        best: tuple[str, int] | None = None
        for _ in range(TEXT_FIT_ATTEMPTS):
            text = self.tokenizer.decode(ids)
            count = len(self.tokenizer(text)["input_ids"])  # as the server counts: with special tokens
            if best is None or abs(count - target) < abs(best[1] - target):
                best = (text, count)
            if count == target:
                break
            if count > target:
                ids = ids[: max(1, len(ids) - (count - target))]
            else:
                ids += [int(t) for t in rng.choice(self.vocab, target - count)]
        assert best is not None
        return best


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # heavy: only when --tokenizer is given

    return AutoTokenizer.from_pretrained(path)
