"""Small, deterministic, randomly initialised models and a locally trained tokenizer for tests and benchmarks.

Nothing here touches a model hub: the tokenizer is trained on the Python standard library's sources and the
weights are drawn from a seeded RNG, so the same inputs give byte-identical folders on any machine with the
same Python, tokenizers and transformers versions.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from services.instance.models.cache import MARKER_NAME, file_lock, is_current, publish_dir, read_marker

# Bump when the output of a builder changes, so cached folders from an older builder are rebuilt.
BUILDER_VERSION = 1

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 8192
MAX_POSITIONS = 4096
# Small enough that ordinary test prompts are longer than the window, so sliding-window attention gets tested.
MISTRAL_SLIDING_WINDOW = 32
# The stdlib's top-level *.py files are ~4.7 MB; 3 MB trains a good 8k vocab in about a second.
CORPUS_BYTES = 3_000_000
TOKENIZER_DIRNAME = "tokenizer"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SIZES: dict[str, dict[str, int]] = {
    # ~5.0 M parameters (2.1 M of them the tied embedding).
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 688,
    },
    # ~26.8 M parameters: big enough that a step is dominated by matmuls, for benchmarks.
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 1408,
    },
}


def _corpus_files() -> list[Path]:
    """Sorted stdlib sources up to CORPUS_BYTES: a fixed list, so training is reproducible."""
    chosen: list[Path] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        size = path.stat().st_size
        if total + size > CORPUS_BYTES:
            continue
        chosen.append(path)
        total += size
    return chosen


def _corpus_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def _corpus_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE whose normalizer and pre-tokenizer equal Qwen2Tokenizer's.

    AutoTokenizer ignores the saved pipeline for qwen2/qwen3 folders and rebuilds it as Qwen2Tokenizer
    (NFC + Qwen2 regex split + ByteLevel without regex); training with exactly that pipeline makes the ids
    identical whichever class ends up loading the folder.
    """
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_texts(_corpus_files()), trainer=trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def _tokenizer_spec() -> dict[str, Any]:
    return {
        "kind": "tokenizer",
        "builder": BUILDER_VERSION,
        "vocab_size": VOCAB_SIZE,
        "special_tokens": list(SPECIAL_TOKENS),
        "corpus": _corpus_digest(_corpus_files()),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }


def build_tokenizer(out_dir: str | Path) -> Path:
    """Train the tokenizer and save it (tokenizer.json, tokenizer_config.json, chat template) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrap_tokenizer(train_tokenizer()).save_pretrained(out)
    return out


def _config(
    arch: str, size: str, tokenizer: PreTrainedTokenizerFast, overrides: dict[str, Any]
) -> PreTrainedConfig:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    kwargs: dict[str, Any] = {
        **SIZES[size],
        "vocab_size": len(tokenizer),
        "max_position_embeddings": MAX_POSITIONS,
        # The 0.02 default makes greedy output collapse to one repeated token, which makes weak tests.
        "initializer_range": 0.1,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "mistral":
        kwargs["sliding_window"] = MISTRAL_SLIDING_WINDOW
    kwargs.update(overrides)
    return CONFIG_MAPPING[arch](**kwargs)


@torch.no_grad()
def _make_nontrivial(model: torch.nn.Module, arch: str, generator: torch.Generator) -> None:
    """Give parameters that random init leaves constant real values, so skipping them changes the output."""
    for name, param in model.named_parameters():
        if arch == "qwen2" and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        elif arch == "qwen3" and name.endswith(("q_norm.weight", "k_norm.weight")):
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))


def build_model(
    arch: str,
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    *,
    tokenizer_dir: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Build a seeded random `arch` model of `size`, save it with its tokenizer and generation config.

    `tokenizer_dir` reuses an already trained tokenizer (its files are copied); without it one is trained.
    `overrides` are passed to the model config (e.g. sliding_window=64).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = wrap_tokenizer(train_tokenizer())
        tokenizer.save_pretrained(out)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file() and item.name != MARKER_NAME:
                shutil.copy2(item, out / item.name)
    config = _config(arch, size, tokenizer, overrides)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # fork_rng keeps the caller's global RNG stream untouched while the init draws from a fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    _make_nontrivial(model, arch, torch.Generator().manual_seed(seed + 1))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model.save_pretrained(out)
    return out


def _model_spec(arch: str, size: str, seed: int, tokenizer_dir: Path) -> dict[str, Any]:
    return {
        "kind": "model",
        "builder": BUILDER_VERSION,
        "arch": arch,
        "size": size,
        "seed": seed,
        "tokenizer": read_marker(tokenizer_dir),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def cached_tokenizer(root: str | Path) -> Path:
    """`root/tokenizer`, trained only when missing or built by a different spec."""
    target = Path(root) / TOKENIZER_DIRNAME
    spec = _tokenizer_spec()
    if is_current(target, spec):
        return target
    with file_lock(target):
        if not is_current(target, spec):
            with publish_dir(target, spec) as staging:
                build_tokenizer(staging)
    return target


def cached_model(arch: str, root: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """`root/<arch>-<size>`, built only when missing or built by a different spec."""
    tokenizer_dir = cached_tokenizer(root)
    target = Path(root) / f"{arch}-{size}" if seed == 0 else Path(root) / f"{arch}-{size}-seed{seed}"
    spec = _model_spec(arch, size, seed, tokenizer_dir)
    if is_current(target, spec):
        return target
    with file_lock(target):
        if not is_current(target, spec):
            with publish_dir(target, spec) as staging:
                build_model(arch, staging, size=size, seed=seed, tokenizer_dir=tokenizer_dir)
    return target


def build_test_models(root: str | Path) -> dict[str, Path]:
    """The four tiny test models (llama, qwen2, qwen3, mistral) sharing one tokenizer, cached under root."""
    return {arch: cached_model(arch, root) for arch in ARCHITECTURES}


if __name__ == "__main__":
    # `python -m services.instance.models.tiny DIR [small]`: build (or reuse) the models, print their folders.
    import time

    started = time.perf_counter()
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    if len(sys.argv) > 2 and sys.argv[2] == "small":
        print(cached_model("llama", directory, size="small"))
    else:
        for arch_name, folder in build_test_models(directory).items():
            print(f"{arch_name}\t{folder}")
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
