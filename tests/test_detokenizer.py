"""IncrementalDetokenizer: streamed text equals a full decode; stop strings cut the stream exactly once.

The tokenizers are trained here, on text written here, so the tests need no download: a byte-level BPE
(GPT-2/Llama-3/SmolLM2 style) and a byte-fallback SentencePiece-style BPE (Llama-2 style). The real
SmolLM2 tokenizer is used too when its converted folder exists.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from services.text.detokenizer import DetokenizerDelta, IncrementalDetokenizer

REPO = Path(__file__).resolve().parents[1]
REPLACEMENT = "\ufffd"

_LINES = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Hello world! This is a small corpus for a tiny tokenizer, with numbers 12345 and 67890.",
    "Serving large language models means streaming text one token at a time to many users.",
    "Emoji are four bytes each: 😀 🎉 🚀 🔥 👍🏽 and a family 👨‍👩‍👧 joined by zero-width joiners.",
    "日本語のテキストも少し含めます。東京タワーは赤い。今日は良い天気ですね。",
    "中文字符也需要正确处理，例如：你好，世界！我们正在测试分词器。",
    "한국어 문장도 있습니다. 안녕하세요, 반갑습니다.",
    "Accents: café, naïve, façade, jalapeño, Zürich, smörgåsbord, crème brûlée.",
    "Symbols and math: α + β = γ, ∑ x² ≤ ∞, → ← ↑ ↓, € £ ¥ ₹.",
    "def stream(tokens):\n    for t in tokens:\n        yield decode(t)  # one at a time\n",
    "Stop strings like END or </answer> or \\n\\n should cut the output exactly where they start.",
    "Mixed: the 猫 sat on the マット and said 🐱 meow, then ran to 서울 for ☕ coffee.",
]
TRAIN_TEXT = "\n".join(_LINES * 6)  # ~6 KB: enough for merges, few enough that rare characters stay split

# Texts to stream: some seen in training, some with characters the tokenizers never merged.
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello 😀 world 🎉 and 日本語 text, café!",
    "Unseen: 🦀🧬🪐 鱼 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ज़ िन्दगी ﷽ end.",
    "  leading spaces, trailing spaces  \n\n new paragraph\ttab",
    "👨‍👩‍👧 family, 👍🏽 thumbs, 🇯🇵 flag; 中文字符，한국어 문장。",
    "The 猫 sat on the マット and said 🐱 meow, then ran to 서울 for ☕ coffee.",
]


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # Non-special added tokens: one with a space (outside the byte alphabet), one CJK, and one whose
    # characters the byte-level decoder maps to invalid UTF-8 (decode itself yields U+FFFD for it).
    wrapped.add_tokens(["<tool call>", "<工具>", "ünï"])
    return wrapped


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=500, limit_alphabet=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    # Characters outside the trained alphabet fall back to <0xNN> byte tokens, as in Llama-2.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    return _byte_level()


@pytest.fixture(scope="module")
def sp_tok() -> PreTrainedTokenizerFast:
    return _sentencepiece_style()


@pytest.fixture(scope="module")
def smol_tok(smollm2_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_path)


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _chunks(ids: list[int], rng: random.Random | None) -> list[list[int]]:
    """One token per push, or random sizes (including empty pushes) when an rng is given."""
    if rng is None:
        return [[i] for i in ids]
    out, pos = [], 0
    while pos < len(ids):
        size = rng.choice([0, 1, 1, 2, 3, 5, 8, 40])
        out.append(ids[pos : pos + size])
        pos += size
    return out


def _stream(
    tok: PreTrainedTokenizerBase,
    ids: list[int],
    rng: random.Random | None = None,
    prompt: Sequence[int] = (),
    skip: bool = True,
    exact: bool = True,
) -> tuple[list[str], str]:
    """Push `ids`, checking after each push that the emitted text is what the ids decode to so far (as
    a continuation of the prompt's text) less only the trailing U+FFFD run, which may be a character
    still arriving; return (deltas, flush()).

    Byte-fallback decoders (`exact=False`) turn a whole run of <0xNN> tokens into U+FFFDs while its last
    character is incomplete, so there the stream may already show more than the partial decode."""
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    head = tok.decode(list(prompt), skip_special_tokens=skip)
    final = tok.decode(list(prompt) + ids, skip_special_tokens=skip)[len(head) :]
    deltas, done = [], 0
    for chunk in _chunks(ids, rng):
        delta = det.push(chunk)
        assert delta.stop_string is None
        deltas.append(delta.text)
        done += len(chunk)
        so_far = tok.decode(list(prompt) + ids[:done], skip_special_tokens=skip)
        assert so_far.startswith(head)
        settled = so_far[len(head) :].rstrip(REPLACEMENT)
        if exact:
            assert det.text == settled, (ids, done)
        else:
            assert det.text.startswith(settled) and final.startswith(det.text), (ids, done)
    assert "".join(deltas) == det.text
    assert det.token_ids == ids
    return deltas, det.flush()


def _random_ids(tok: PreTrainedTokenizerBase, rng: random.Random, single_bytes: list[int]) -> list[int]:
    """Ids that often form invalid or incomplete UTF-8: lone bytes, any vocab entry, special tokens."""
    special = tok.all_special_ids
    ids = []
    for _ in range(rng.randrange(0, 40)):
        r = rng.random()
        if r < 0.5:
            ids.append(rng.choice(single_bytes))
        elif r < 0.85:
            ids.append(rng.randrange(len(tok)))
        else:
            ids.append(rng.choice(special))
    return ids


def _byte_level_single_bytes(tok: PreTrainedTokenizerBase) -> list[int]:
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    return [i for tokn, i in tok.get_vocab().items() if len(tokn) == 1 and tokn in alphabet]


def _check_random_invariant(tok: PreTrainedTokenizerBase, single_bytes: list[int], trials: int) -> None:
    """Byte-level: the same with or without a prompt (one ending on a character boundary, as encoded
    text does), since the byte-level decoder has no leading-space rule."""
    rng = random.Random(1234)
    prompts = [[], *(_encode(tok, text) for text in SAMPLES)]
    for _ in range(trials):
        ids = _random_ids(tok, rng, single_bytes)
        skip = rng.random() < 0.5
        chunking = rng if rng.random() < 0.5 else None
        deltas, tail = _stream(tok, ids, chunking, prompt=rng.choice(prompts), skip=skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), ids


def _check_text_invariant(
    tok: PreTrainedTokenizerBase, prompt: Sequence[int] = (), exact: bool = True
) -> None:
    rng = random.Random(99)
    for text in SAMPLES:
        ids = _encode(tok, text)
        expected = tok.decode(ids, skip_special_tokens=True)
        for chunking in (None, rng, rng):
            deltas, tail = _stream(tok, ids, chunking, prompt=prompt, exact=exact)
            assert "".join(deltas) + tail == expected
            assert tail == ""  # valid text leaves nothing held back
            assert not any(REPLACEMENT in d for d in deltas)


# --- the invariant: with no stop strings, the streamed text is the full decode ----------------------


def test_module_imports_neither_torch_nor_transformers() -> None:
    code = "import sys, services.text; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_random_ids_byte_level(byte_tok: PreTrainedTokenizerFast) -> None:
    single = _byte_level_single_bytes(byte_tok)
    assert len(single) == 256
    _check_random_invariant(byte_tok, single, trials=400)


def test_real_text_byte_level_one_token_and_random_chunks(byte_tok: PreTrainedTokenizerFast) -> None:
    _check_text_invariant(byte_tok)


def test_prompt_context_changes_nothing_for_byte_level(byte_tok: PreTrainedTokenizerFast) -> None:
    prompt = _encode(byte_tok, "<|im_start|>user\nSay hi 👋<|im_end|>\n<|im_start|>assistant\n")
    _check_text_invariant(byte_tok, prompt)


def _byte_tokens(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])


def test_random_ids_sentencepiece_style(sp_tok: PreTrainedTokenizerFast) -> None:
    """Random pieces, characters as runs of <0xNN> tokens, special tokens; byte runs are valid UTF-8 (an
    invalid run is the case below, where decode() rewrites characters already complete)."""
    rng = random.Random(4321)
    byte_ids = set(sp_tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]))
    pieces = [i for i in range(len(sp_tok)) if i not in byte_ids and i not in sp_tok.all_special_ids]
    chars = "aZ 9\n\té日本🦀👍🏽\u200d한€\U0001d518"
    for _ in range(400):
        ids: list[int] = []
        for _ in range(rng.randrange(0, 25)):
            r = rng.random()
            if r < 0.4:
                ids.append(rng.choice(pieces))
            elif r < 0.55:
                ids.append(rng.choice(sp_tok.all_special_ids))
            else:
                ids.extend(_byte_tokens(sp_tok, rng.choice(chars)))
        skip = rng.random() < 0.5
        deltas, tail = _stream(sp_tok, ids, rng if rng.random() < 0.5 else None, skip=skip, exact=False)
        assert "".join(deltas) + tail == sp_tok.decode(ids, skip_special_tokens=skip), ids


def test_invalid_byte_fallback_run(sp_tok: PreTrainedTokenizerFast) -> None:
    """decode() turns every byte of an invalid <0xNN> run into U+FFFD, "日" included; a stream has shown
    "日" by then, so it shows the stray byte as one U+FFFD and goes on."""
    ids = [*_byte_tokens(sp_tok, "日"), sp_tok.convert_tokens_to_ids("<0xB6>"), *_encode(sp_tok, "the end")]
    assert sp_tok.decode(ids).startswith(REPLACEMENT * 4)
    det = IncrementalDetokenizer(sp_tok)
    deltas = [det.push([i]).text for i in ids]
    assert deltas[:4] == ["", "", "日", ""]
    assert det.text + det.flush() == "日" + REPLACEMENT + " the end"


def test_real_text_sentencepiece_style(sp_tok: PreTrainedTokenizerFast) -> None:
    assert any(t.startswith("<0x") for t in sp_tok.convert_ids_to_tokens(_encode(sp_tok, SAMPLES[2])))
    _check_text_invariant(sp_tok, exact=False)


def test_sentencepiece_prompt_gives_the_leading_space(sp_tok: PreTrainedTokenizerFast) -> None:
    prompt, out = _encode(sp_tok, "Hello world!"), _encode(sp_tok, "Hello world! The quick 🦀 fox")
    out = out[len(prompt) :]
    assert sp_tok.convert_ids_to_tokens(out)[0].startswith("▁")
    deltas, tail = _stream(sp_tok, out, prompt=prompt, exact=False)
    # Continuation of the prompt's text, as vLLM gives it; without a prompt, decode() drops the space.
    full, head = sp_tok.decode(prompt + out), sp_tok.decode(prompt)
    assert "".join(deltas) + tail == full[len(head) :] == " The quick 🦀 fox"
    deltas, tail = _stream(sp_tok, out, exact=False)
    assert "".join(deltas) + tail == sp_tok.decode(out) == "The quick 🦀 fox"


def test_smollm2_tokenizer(smol_tok: PreTrainedTokenizerBase) -> None:
    _check_text_invariant(smol_tok)
    chat = smol_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    _check_text_invariant(smol_tok, _encode(smol_tok, chat))
    _check_random_invariant(smol_tok, _byte_level_single_bytes(smol_tok), trials=200)


def test_window_stays_small(byte_tok: PreTrainedTokenizerFast) -> None:
    """Per-token cost is O(1): each decode covers a few tokens, however long the output gets."""
    ids = _encode(byte_tok, " ".join(SAMPLES) * 20)
    det = IncrementalDetokenizer(byte_tok)
    sizes: list[int] = []
    decode = det._decode

    def counting(window: list[int]) -> str:
        sizes.append(len(window))
        return decode(window)

    det._decode = counting
    for i in ids:
        det.push([i])
    assert len(ids) > 2000 and max(sizes) <= 8
    assert det.text + det.flush() == byte_tok.decode(ids)


# --- multi-byte characters and special tokens -------------------------------------------------------


def test_multibyte_character_is_emitted_once_complete(byte_tok: PreTrainedTokenizerFast) -> None:
    ids = _encode(byte_tok, "a 🦀 b")
    prefixes = [byte_tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    first_byte = next(k for k, t in enumerate(prefixes) if t.endswith(REPLACEMENT))
    complete = next(k for k, t in enumerate(prefixes) if "🦀" in t)
    assert complete - first_byte >= 2  # the crab's 4 bytes are split over three or more tokens
    det = IncrementalDetokenizer(byte_tok)
    deltas = [det.push([i]).text for i in ids]
    assert not any(REPLACEMENT in d for d in deltas)
    # Nothing of the crab shows until its last byte arrives; then it shows whole, once.
    assert [k for k, d in enumerate(deltas, 1) if "🦀" in d] == [complete]
    assert _running(deltas)[complete - 2] == "a "
    assert "".join(deltas) + det.flush() == "a 🦀 b"


def _running(deltas: list[str]) -> list[str]:
    return ["".join(deltas[: i + 1]) for i in range(len(deltas))]


def test_incomplete_character_at_the_end_flushes_as_decode_does(byte_tok: PreTrainedTokenizerFast) -> None:
    ids = _encode(byte_tok, "ok 🦀")[:-1]
    det = IncrementalDetokenizer(byte_tok)
    assert det.push(ids).text == "ok "
    tail = det.flush()
    assert tail and set(tail) == {REPLACEMENT}
    assert det.text == byte_tok.decode(ids)


def test_prompt_ending_inside_a_character(byte_tok: PreTrainedTokenizerFast) -> None:
    ids = _encode(byte_tok, "x🦀")
    cut = next(i for i in range(1, len(ids)) if byte_tok.decode(ids[:i]).endswith(REPLACEMENT))
    det = IncrementalDetokenizer(byte_tok, ids[:cut])
    # The character completes in the output: it is shown whole, never as U+FFFD halves.
    assert det.push(ids[cut:]).text + det.flush() == "🦀"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(byte_tok: PreTrainedTokenizerFast, skip: bool) -> None:
    eos, im_end = byte_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    ids = [*_encode(byte_tok, "Hi 日本"), eos, *_encode(byte_tok, " more <tool call> 🎉"), im_end]
    deltas, tail = _stream(byte_tok, ids, skip=skip)
    text = "".join(deltas) + tail
    assert text == byte_tok.decode(ids, skip_special_tokens=skip)
    if skip:
        assert text == "Hi 日本 more <tool call> 🎉"
    else:
        assert text == "Hi 日本<|endoftext|> more <tool call> 🎉<|im_end|>"


# --- stop strings ------------------------------------------------------------------------------------


def _run_stop(
    tok: PreTrainedTokenizerBase, text: str, stop: list[str], include: bool = False, chunk: int = 1
) -> tuple[IncrementalDetokenizer, list[DetokenizerDelta], list[int]]:
    ids = _encode(tok, text)
    det = IncrementalDetokenizer(tok, stop=stop, include_stop_str_in_output=include)
    deltas = []
    for pos in range(0, len(ids), chunk):
        deltas.append(det.push(ids[pos : pos + chunk]))
    return det, deltas, ids


def test_stop_at_the_start(byte_tok: PreTrainedTokenizerFast) -> None:
    det, deltas, _ = _run_stop(byte_tok, "END of the story", ["END"])
    assert det.text == "" and det.stop_string == "END" and det.flush() == ""
    assert [d.stop_string for d in deltas if d.stop_string] == ["END"]


def test_stop_in_the_middle_ignores_later_tokens(byte_tok: PreTrainedTokenizerFast) -> None:
    det, deltas, ids = _run_stop(byte_tok, "Hello world. END of the story", ["END"])
    assert det.text == "Hello world. " and det.stop_string == "END"
    # token_ids stop at the token that completed the stop string; the rest of the pushes were ignored.
    k = next(k for k in range(len(ids) + 1) if "END" in byte_tok.decode(ids[:k]))
    assert det.token_ids == ids[:k]
    assert deltas[k - 1].stop_string == "END"
    assert all(d == DetokenizerDelta("") for d in deltas[k:])
    assert det.flush() == "" and det.text == "Hello world. "


def test_stop_spanning_several_tokens_is_never_partly_emitted(byte_tok: PreTrainedTokenizerFast) -> None:
    stop = " brown fox jumps"
    assert len(_encode(byte_tok, stop)) >= 3
    det, deltas, _ = _run_stop(byte_tok, "The quick brown fox jumps over", [stop])
    assert det.text == "The quick" and det.stop_string == stop
    assert all(" b" not in t for t in _running([d.text for d in deltas]))


def test_include_stop_str_in_output(byte_tok: PreTrainedTokenizerFast) -> None:
    det, _, _ = _run_stop(byte_tok, "Hello world. END of the story", ["END"], include=True)
    assert det.text == "Hello world. END" and det.stop_string == "END"
    det, _, _ = _run_stop(byte_tok, "Answer: 42</answer> trailing", ["</answer>"], include=True, chunk=4)
    assert det.text == "Answer: 42</answer>"


def test_overlapping_prefixes_of_two_stop_strings(byte_tok: PreTrainedTokenizerFast) -> None:
    stops = ["the lazy cat", "lazy dog"]
    ids = _encode(byte_tok, "over the lazy dog today")
    det = IncrementalDetokenizer(byte_tok, stop=stops)
    seen = []
    for i in ids:
        det.push([i])
        seen.append((byte_tok.decode(ids[: len(seen) + 1]), det.text))
    # While "the lazy" could still become the first stop string it is held back; "lazy dog" then ends the
    # stream, releasing "the " but nothing of itself.
    assert ("over the lazy", "over ") in seen
    assert det.text == "over the " and det.stop_string == "lazy dog"


def test_stop_that_never_completes_is_released_by_flush(byte_tok: PreTrainedTokenizerFast) -> None:
    det, deltas, ids = _run_stop(byte_tok, "Hello world", ["world peace"])
    assert det.text == "Hello " and all(d.stop_string is None for d in deltas)
    assert det.flush() == "world"
    assert det.text == "Hello world" == byte_tok.decode(ids) and det.stop_string is None and det.finished
    with pytest.raises(RuntimeError):
        det.push(ids[:1])


def test_earliest_stop_wins_within_one_push(byte_tok: PreTrainedTokenizerFast) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    det, _, _ = _run_stop(byte_tok, text, ["lazy", "quick"], chunk=1000)
    assert det.text == "The " and det.stop_string == "quick"
    # The first stop string to complete wins, as it would have one token at a time: "fox" completes
    # before "brown fox jumps" does, though the latter starts earlier.
    for chunk in (1, 3, 1000):
        det, _, _ = _run_stop(byte_tok, text, ["brown fox jumps", "fox"], chunk=chunk)
        assert (det.text, det.stop_string) == ("The quick brown ", "fox")
    # The same when both complete inside one token, " the": " t" ends first, so it beats "over th".
    assert "Ġthe" in byte_tok.convert_ids_to_tokens(_encode(byte_tok, "over the lazy dog"))
    det, _, _ = _run_stop(byte_tok, "over the lazy dog", ["over th", " t"], include=True)
    assert (det.text, det.stop_string) == ("over t", " t")


def test_stop_completed_by_the_flushed_tail(byte_tok: PreTrainedTokenizerFast) -> None:
    ids = _encode(byte_tok, "ok 🦀")[:-1]
    det = IncrementalDetokenizer(byte_tok, stop=[" " + REPLACEMENT])
    assert det.push(ids).text == "ok"
    assert det.flush() == "" and det.stop_string == " " + REPLACEMENT and det.text == "ok"


def _oracle(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Brute force: the first end position where a stop string completes (the longest on a tie);
    without one, the text less its longest suffix that could start a stop string."""
    for end in range(1, len(full) + 1):
        done = [s for s in stops if full[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return full[: end if include else end - len(stop)], stop
    hold = max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
    return full[: len(full) - hold], None


def test_stop_strings_against_brute_force(byte_tok: PreTrainedTokenizerFast) -> None:
    rng = random.Random(7)
    for _ in range(300):
        text = rng.choice(SAMPLES)
        ids = _encode(byte_tok, text)
        full = byte_tok.decode(ids)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            a = rng.randrange(len(full))
            piece = full[a : a + rng.randrange(1, 8)]
            # Substrings that occur, and near-misses that share a prefix but never complete.
            stops.append(piece if rng.random() < 0.6 else piece + "\x00")
        include = rng.random() < 0.3
        det = IncrementalDetokenizer(byte_tok, stop=stops, include_stop_str_in_output=include)
        done = 0
        before_flush = ""
        for chunk in _chunks(ids, rng if rng.random() < 0.5 else None):
            delta = det.push(chunk)
            done += len(chunk)
            so_far = byte_tok.decode(ids[:done])
            expected, stop = _oracle(so_far.rstrip(REPLACEMENT), stops, include)
            if stop is not None:
                assert (det.text, det.stop_string) == (expected, stop), (text, stops)
                assert delta.stop_string == stop
                # exactly the tokens up to the one whose text completed the stop string
                first = next(k for k in range(done + 1) if _oracle(byte_tok.decode(ids[:k]), stops, False)[1])
                assert det.token_ids == ids[:first]
                break
            assert det.text == expected, (text, stops, done)
            before_flush = det.text
        tail = det.flush()
        final, stop = _oracle(full, stops, include)
        if stop is None:  # flush() releases what was held for a stop string that never came
            final = full
            assert before_flush + tail == full
        assert (det.text, det.stop_string) == (final, stop), (text, stops)


def test_long_periodic_stop_strings_hold_back_and_match(byte_tok: PreTrainedTokenizerFast) -> None:
    stop = "ab" * 512  # the router's longest; every other prefix ends in "b"
    det, _, _ = _run_stop(byte_tok, "xy" + "ab" * 300, [stop, "q" * 1024])
    assert det.text == "xy" and det.stop_string is None, "all of 'abab…' could still become the stop"
    assert det.flush() == "ab" * 300
    det, _, _ = _run_stop(byte_tok, "xy" + "ab" * 600 + "z", [stop])
    assert det.text == "xy" and det.stop_string == stop
