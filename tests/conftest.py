"""Session fixtures shared by all tests: the locally built tiny models and the default SmolLM2 model."""

# Before torch/transformers are imported: no hub access, and one thread (CI machines have 2 shared cores).
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

from services.instance.models.smollm2 import default_model_path
from services.instance.models.tiny import build_test_models

torch.set_num_threads(1)

# Real nats-server and redis-server on random loopback ports (tests/fixtures_infra.py).
pytest_plugins = ["fixtures_infra"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llama, qwen2, qwen3, mistral → model folder; set `$ECOSERVE_TEST_CACHE` to keep them across runs."""
    configured = os.environ.get("ECOSERVE_TEST_CACHE")
    root = Path(configured).expanduser() if configured else tmp_path_factory.mktemp("tiny-models")
    return build_test_models(root)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The fp32 SmolLM2-135M-Instruct folder (converted into the ecoserve cache on first use)."""
    return default_model_path("fp32")
