"""The model this router serves: its names, tokenizer and context length, loaded without torch.

`services.instance.models.loader` imports torch (and `AutoTokenizer` pulls it in through the model configs),
which would add ~1 s and hundreds of MB to every router. So the folder rules are repeated here for local
folders, the tokenizer is loaded with `PreTrainedTokenizerFast` (tokenizer.json needs no torch), and only the
default-model aliases, whose first use converts weights, are resolved by the loader in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The loader's aliases for the default model (tests check both sets stay equal).
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "default"})
_RESOLVE_TIMEOUT = 600.0  # the first use converts the default model (~20 s); later ones take ~3 s


class ModelSourceError(Exception):
    """The model folder or its tokenizer cannot be used; the message names the offending value."""


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id in /v1/models and in responses
    aliases: frozenset[str]  # other names requests may use (the --model value, the folder path)
    tokenizer: PreTrainedTokenizerBase
    root: str  # the folder, shown as /v1/models' `root`
    config_max_model_len: int | None  # from config.json; instances may report a smaller one
    vocab_size: int  # token ids in prompts and stop_token_ids must be below this
    created: int = field(default_factory=lambda: int(time.time()))

    def matches(self, requested: str | None) -> bool:
        """Whether a request's `model` names this model (a missing one means "the one you serve")."""
        return requested is None or requested == self.name or requested in self.aliases


def resolve_model_folder(spec: str | None) -> Path:
    """The local folder for a --model value: a folder with config.json, or a default-model alias."""
    if spec is None or spec.strip().lower() in DEFAULT_MODEL_ALIASES:
        return _resolve_default(spec)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelSourceError(
            f"model folder {str(path)!r} does not exist (expected a local folder with config.json, "
            f"or one of: {', '.join(sorted(DEFAULT_MODEL_ALIASES))})"
        )
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model folder {str(path)!r} has no config.json")
    return path.resolve()


def _resolve_default(spec: str | None) -> Path:
    # In a child process: the loader imports torch, and the first use converts the weights.
    code = (
        "import sys\n"
        "from services.instance.models.loader import resolve_model_path\n"
        "print(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else None))\n"
    )
    argv = [sys.executable, "-c", code, *([spec] if spec is not None else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_RESOLVE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelSourceError(f"cannot prepare the default model: {error}") from error
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelSourceError(f"cannot prepare the default model: {detail}")
    return Path(lines[-1])


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ModelSourceError(f"cannot load the tokenizer from {str(folder)!r}: {error}") from error


def read_model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ModelSourceError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise ModelSourceError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    # Multimodal configs keep the language model's settings in a nested text_config.
    text_config = data.get("text_config")
    return {**data, **text_config} if isinstance(text_config, dict) else data


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def build_served_model(
    spec: str | None,
    *,
    served_model_name: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ServedModel:
    """Resolve the folder, load the tokenizer (unless given) and read the context length and vocabulary."""
    folder: Path | None
    if spec is None and tokenizer is not None:
        name_or_path = getattr(tokenizer, "name_or_path", "") or ""
        folder = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
    else:
        folder = resolve_model_folder(spec)
    if tokenizer is None:
        assert folder is not None
        tokenizer = load_tokenizer(folder)
    config = read_model_config(folder) if folder is not None and (folder / "config.json").is_file() else {}
    max_len = _positive_int(config.get("max_position_embeddings"))
    if max_len is None:
        # Tokenizers without a limit report a huge sentinel (1e30); only a plausible value is a limit.
        model_max = _positive_int(getattr(tokenizer, "model_max_length", None))
        max_len = model_max if model_max is not None and model_max < 10_000_000 else None
    vocab_size = _positive_int(config.get("vocab_size")) or len(tokenizer)
    name = served_model_name or (folder.name if folder is not None else None) or spec or "default"
    aliases = {alias for alias in (spec, str(folder) if folder else None) if alias}
    return ServedModel(
        name=name,
        aliases=frozenset(aliases - {name}),
        tokenizer=tokenizer,
        root=str(folder) if folder is not None else name,
        config_max_model_len=max_len,
        vocab_size=vocab_size,
    )
