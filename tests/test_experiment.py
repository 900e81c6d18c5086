"""bench/experiment.py end to end in quick mode: a real two-instance cluster of the tiny Llama per cell,
`ecoserve bench --search` against it, and the summary JSON, plots and markdown it writes. Speed is not
checked (the numbers of a 2 s run mean nothing); the shape of what a full run produces is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_experiment_writes_results(tiny_models, tmp_path):
    out, raw, markdown = tmp_path / "out", tmp_path / "raw", tmp_path / "results.md"
    command = [
        sys.executable,
        str(REPO / "bench" / "experiment.py"),
        "--quick",
        "--strategies",
        "nodg",
        "--model",
        str(tiny_models["llama"]),
        "--dtype",
        "float32",
        "--duration",
        "2",
        "--max-runs",
        "1",
        "--raw-dir",
        str(raw),
        "--out-dir",
        str(out),
        "--markdown",
        str(markdown),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| sharegpt | P90 |" in done.stdout  # the goodput table is printed too

    document = json.loads((out / "results.json").read_text())
    assert document["schema"] == "ecoserve-experiment/1"
    assert document["setup"]["workloads"] == ["sharegpt"] and document["setup"]["quick"] is True
    assert document["machine"]["cores"] and document["machine"]["loadavg_start"]
    (cell,) = document["cells"]
    assert cell["status"] == "ok", cell["reason"]
    assert (cell["strategy"], cell["workload"]) == ("nodg", "sharegpt")
    (run,) = cell["runs"]
    assert run["num_requests"] >= 4 and 0.0 <= run["attainment"] <= 1.0
    assert run["cpu"]["cluster_cores"] > 0 and run["cpu"]["background_cores"] >= 0  # sampled per run
    assert set(cell["goodput"]) == {"p50", "p90", "p99"}
    assert "background_cores" in cell["background"] and cell["startup_s"] > 0
    assert {r["instance"] for r in cell["timeline"]["records"]} == {"instance-0", "instance-1"}
    for name in ("attainment-sharegpt.png", "phases.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((raw / "nodg-sharegpt.json").read_text())["runs"][0]["phases"]

    text = markdown.read_text()
    assert text.startswith("# Results") and "Preliminary" in text and "quick mode" in text
    assert "## Goodput (req/s) per strategy" in text and "| sharegpt | P90 |" in text
    assert "![phase timeline](out/phases.png)" in text and "PaDG did not run" in text
