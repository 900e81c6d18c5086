"""`ecoserve generate` and its Python equivalent, checked against `model.generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from services.instance.engine.llm_engine import EngineConfig
from services.instance.models.loader import load_model, load_tokenizer
from services.instance.offline import LLM, InputError

PROMPTS = [
    "def add(a, b):\n    return",
    "import json\nimport os\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x = [i for i in",
]


def reference(path, prompt_ids: list[int], max_new: int) -> list[int]:
    model = load_model(path, dtype="float32", attn_implementation="sdpa")
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ECOSERVE_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_generate_matches_model_generate(tiny_models, tmp_path):
    path = tiny_models["qwen3"]
    tokenizer = load_tokenizer(path)
    requests = [
        {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
        {
            "id": "ids",
            "prompt_token_ids": tokenizer(PROMPTS[1])["input_ids"],
            "max_tokens": 20,
            "temperature": 0,
            "logprobs": 2,
        },
        {"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0.8, "seed": 3},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    proc = run_cli(
        "generate", "--model", str(path), "--dtype", "float32", "--input", str(src), "--output", str(dst)
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "ids", "2"]
    for row, req in zip(rows[:2], requests[:2], strict=True):
        ids = req.get("prompt_token_ids") or tokenizer(req["prompt"])["input_ids"]
        assert row["token_ids"] == reference(path, ids, req["max_tokens"])
        assert row["prompt_tokens"] == len(ids)
        assert row["completion_tokens"] == len(row["token_ids"])
        assert row["text"] == tokenizer.decode(row["token_ids"], skip_special_tokens=True)
        assert row["finish_reason"] in ("length", "stop")
    assert len(rows[1]["logprobs"]) == len(rows[1]["token_ids"])
    assert all(len(lp["top_logprobs"]) == 2 and lp["rank"] == 1 for lp in rows[1]["logprobs"])
    assert "logprobs" not in rows[0]
    # the seeded sampled request reproduces
    again = tmp_path / "again.jsonl"
    src.write_text(json.dumps(requests[2]) + "\n")
    assert (
        run_cli(
            "generate",
            "--model",
            str(path),
            "--dtype",
            "float32",
            "--input",
            str(src),
            "--output",
            str(again),
        ).returncode
        == 0
    )
    assert json.loads(again.read_text())["token_ids"] == rows[2]["token_ids"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": ""}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "nonsense": True}, "nonsense"),
    ],
)
def test_cli_rejects_bad_lines_naming_the_field(tiny_models, tmp_path, line, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "fine", "max_tokens": 2}) + "\n" + json.dumps(line) + "\n")
    proc = run_cli(
        "generate", "--model", str(tiny_models["llama"]), "--input", str(src), "--output", str(dst)
    )
    assert proc.returncode == 2
    assert "request 1" in proc.stderr and message in proc.stderr
    assert not dst.exists(), "nothing is generated when any line is bad"


def test_cli_reports_a_missing_model_folder_and_bad_json(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    proc = run_cli(
        "generate", "--model", str(tmp_path / "nope"), "--input", str(src), "--output", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and str(tmp_path / "nope") in proc.stderr
    src.write_text('{"prompt": "hi"\n')
    proc = run_cli(
        "generate", "--model", str(tmp_path / "nope"), "--input", str(src), "--output", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "in.jsonl:1" in proc.stderr


def test_python_api_stop_strings_and_stop_token_ids(tiny_models):
    path = tiny_models["llama"]
    llm = LLM(path, dtype="float32", config=EngineConfig(max_num_batched_tokens=256))
    plain = llm.generate([{"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}])[0]
    text, ids = plain["text"], plain["token_ids"]
    assert len(text) > 10
    stop = text[4:7]
    cut = llm.generate(
        [{"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}]
    )[0]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == text[: text.index(stop)]
    assert cut["token_ids"] == ids[: len(cut["token_ids"])] and len(cut["token_ids"]) < len(ids)
    kept = llm.generate(
        [
            {
                "prompt": PROMPTS[1],
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
                "stop": [stop],
                "include_stop_str_in_output": True,
            }
        ]
    )[0]
    assert kept["text"] == text[: text.index(stop) + len(stop)]
    by_id = llm.generate(
        [
            {
                "prompt": PROMPTS[1],
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
                "stop_token_ids": [ids[5]],
            }
        ]
    )[0]
    assert by_id["token_ids"] == ids[: ids.index(ids[5]) + 1]
    assert by_id["finish_reason"] == "stop" and by_id["stop_reason"] == ids[5]
    with pytest.raises(InputError, match="request 0: prompt"):
        llm.generate([{"prompt": 42}])
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
