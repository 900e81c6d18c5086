"""The router as a process: `python -m services.router` starts, logs its URL, serves, stops on SIGTERM, and
never loads torch (a router must stay light; the instance is the only torch process)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.instance.models.loader import DEFAULT_MODEL_ALIASES as LOADER_ALIASES
from services.instance.models.smollm2 import default_model_path
from services.router.served_model import DEFAULT_MODEL_ALIASES, build_served_model

REPO = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(rb"listening on (http://\S+)")


def test_default_model_aliases_match_the_loader() -> None:
    assert DEFAULT_MODEL_ALIASES == LOADER_ALIASES


@pytest.mark.slow
def test_the_default_model_alias_resolves_in_a_child_process() -> None:
    folder = default_model_path("bf16")  # converts on first use, in whatever cache dir is configured
    model = build_served_model("smollm2")
    assert Path(model.root) == folder and model.name == folder.name
    assert model.matches("smollm2") and model.matches(str(folder)) and not model.matches("other")
    assert model.config_max_model_len == 8192 and model.vocab_size == 49152


def test_the_router_modules_do_not_import_torch(tiny_models: dict[str, Path]) -> None:
    # A fresh interpreter: this test process has torch loaded already.
    code = f"""
import sys
import services.router.__main__
from services.router.app import create_app
from services.router.served_model import build_served_model
from services.router.parsing import parse_chat
from services.router.prompts import chat_prompt_ids
from services.router.token_text import TokenText
from shared.config import RouterConfig

create_app(RouterConfig(model={str(tiny_models["llama"])!r}))
model = build_served_model({str(tiny_models["llama"])!r})
ids = chat_prompt_ids(model.tokenizer, parse_chat({{"messages": [{{"role": "user", "content": "hi"}}]}}))
TokenText(model.tokenizer).bytes(ids[0])
print(len(ids), "torch" in sys.modules, "transformers.modeling_utils" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    count, torch_loaded, modeling_loaded = done.stdout.split()
    assert int(count) > 0 and torch_loaded == "False" and modeling_loaded == "False"


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_python_m_services_router_serves_and_stops(
    nats_server, redis_server, tiny_models, ecoserve_prefix
) -> None:
    argv = [
        sys.executable,
        "-m",
        "services.router",
        "--model",
        str(tiny_models["llama"]),
        "--served-model-name",
        "tiny",
        "--nats-url",
        nats_server.url,
        "--redis-url",
        redis_server.url,
        "--prefix",
        ecoserve_prefix,
        "--port",
        "0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        log = b""
        deadline = time.monotonic() + 60
        while (match := URL_LINE.search(log)) is None:
            line = process.stderr.readline()
            assert line or process.poll() is None, log.decode()
            assert time.monotonic() < deadline, log.decode()
            log += line
        url = match.group(1).decode()

        status, body = _get(f"{url}/health")
        assert status == 503 and "no instance" in body["error"]["message"]
        status, body = _get(f"{url}/v1/models")
        assert status == 200 and body["data"][0]["id"] == "tiny"
        maps = Path(f"/proc/{process.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_missing_model_folder_exits_with_a_clear_message(nats_server, redis_server, tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    argv = [sys.executable, "-m", "services.router", "--model", str(missing), "--nats-url", nats_server.url]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert str(missing) in done.stderr and "does not exist" in done.stderr
