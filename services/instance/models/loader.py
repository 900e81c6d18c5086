"""Turn a model setting (a local folder, or the default model's name) into a loaded tokenizer and model.

Every failure a user can cause (a wrong path, an unsupported architecture, a typo in the dtype) is raised as
ModelError with a message that names the offending value, so services can report it instead of a traceback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from services.instance.models import smollm2

# Architectures whose unmodified transformers code has been checked against the paged attention backend.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "default"})

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "auto": "auto",  # whatever the checkpoint's config.json records
}


class ModelError(Exception):
    """A model cannot be found, is not supported, or cannot be loaded as asked."""


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A torch dtype (or "auto") from a torch dtype or one of the accepted names."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    parsed = _DTYPES.get(str(dtype).strip().lower())
    if parsed is None:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    return parsed


def _default_variant(dtype: torch.dtype | str) -> str:
    # fp16 is cast from the fp32 conversion rather than from bf16, which has fewer mantissa bits.
    parsed = parse_dtype(dtype)
    return "fp32" if parsed in (torch.float32, torch.float16) else "bf16"


def resolve_model_path(spec: str | Path | None, *, dtype: torch.dtype | str = "bf16") -> Path:
    """None, "default" or "smollm2" → the default model (converted on first use); otherwise a local folder.

    `dtype` only chooses which stored copy of the default model is returned; a local folder is used as is.
    """
    if spec is None or str(spec).strip().lower() in DEFAULT_MODEL_ALIASES:
        try:
            return smollm2.default_model_path(_default_variant(dtype))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            raise ModelError(f"the default model {smollm2.MODEL_NAME} could not be prepared: {exc}") from exc
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model folder {str(path)!r} does not exist (expected a local folder with config.json, "
            f"or one of: {', '.join(sorted(DEFAULT_MODEL_ALIASES))})"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {str(path)!r} has no config.json")
    return path.resolve()


def read_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text())
    except OSError as exc:
        raise ModelError(f"cannot read {config_path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}") from exc


def check_architecture(path: str | Path) -> str:
    """The folder's model_type, or ModelError when it is not one the engine supports."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = ", ".join(config.get("architectures") or []) or "none listed"
        raise ModelError(
            f"model at {str(path)!r} has model_type {model_type!r} (architectures: {architectures}), "
            f"which is not supported; supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    return model_type


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"tokenizer folder {str(folder)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {str(folder)!r}: {exc}") from exc


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The causal LM in `path`, in eval mode on `device`, with gradients off (the engine never trains)."""
    torch_dtype = parse_dtype(dtype)
    check_architecture(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            Path(path), dtype=torch_dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model from {str(path)!r}: {exc}") from exc
    model.to(torch.device(device))
    model.eval()
    model.requires_grad_(False)
    return model
