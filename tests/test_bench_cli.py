"""`ecoserve bench` end to end: a real cluster (`ecoserve up` with the tiny Llama on the session's NATS and
Redis), benchmarked by the command as a subprocess; its JSON must account for every request exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.infra.embedded import free_port

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def cluster(tiny_models, nats_server, redis_server, tmp_path) -> Iterator[tuple[str, str]]:
    """The router's URL and the cluster's subject prefix."""
    port = free_port()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - the child writes it until the end of the test
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--model",
            str(tiny_models["llama"]),
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--threads-per-instance",
            "1",
            "--nats-url",
            nats_server.url,
            "--redis-url",
            redis_server.url,
            "--prefix",
            prefix,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env=ENV,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        url = None
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, (tmp_path / "up.log").read_text()
            if line.startswith("{"):
                url = json.loads(line)["url"]
        assert url, (tmp_path / "up.log").read_text()
        yield url, prefix
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log.close()


def bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "services.cli", "bench", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)


def check_exact(run: dict) -> None:
    assert run["failed"] == 0 and run["errors"] == {}, run["errors"]
    for request in run["requests"]:
        assert request["success"], request["error"]
        assert request["usage_reported"]
        assert request["output_tokens"] == request["output_len"]  # ignore_eos: exactly max_tokens
        assert request["prompt_tokens"] == request["input_len"]  # token-id prompts: exact lengths
        assert request["meets_slo"]
        assert len(request["itl_s"]) <= request["output_tokens"] - 1


def test_bench_fixed_rate_and_search_against_a_cluster(cluster, nats_server, tmp_path):
    cluster_url, prefix = cluster
    out = tmp_path / "fixed.json"
    common = ["--url", cluster_url, "--workload", "alpaca", "--scale", "0.1", "--seed", "3"]
    slos = ["--slo-ttft", "30", "--slo-tpot", "5"]  # generous: a loaded 2-core box must still meet them
    phases = ["--nats", nats_server.url, "--prefix", prefix]  # the instance's status reports
    done = bench(
        *common,
        *slos,
        *phases,
        "--rate",
        "4",
        "--duration",
        "2",
        "--json",
        str(out),
        "--plot-dir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "Serving Benchmark Result" in done.stdout
    document = json.loads(out.read_text())
    assert document["attainment"] == 1.0 and document["goodput_rps"] is None
    assert (
        document["config"]["workload"]["input_scale"] == document["config"]["workload"]["output_scale"] == 0.1
    )
    assert document["config"]["slo"] == {"ttft_s": 30.0, "tpot_s": 5.0}
    (run,) = document["runs"]
    assert run["num_requests"] == len(run["requests"]) == 8  # 4 req/s for 2 s
    check_exact(run)
    assert run["total_output_tokens"] == sum(r["output_len"] for r in run["requests"])
    assert all(
        Path(tmp_path, name).stat().st_size > 1000 for name in ("attainment.png", "latency.png", "phases.png")
    )
    # The one instance's timeline: its state at the run's start, then its transitions (a sarathi cluster:
    # no prefill window), and it did run prefills while requests arrived.
    assert document["config"]["nats"] == {"url": nats_server.url, "prefix": prefix}
    timeline = run["phases"]
    assert {r["instance"] for r in timeline} == {"instance-0"} and timeline[0]["t"] == 0.0
    assert all(r["prefill_window"] is None for r in timeline)
    assert {r["phase"] for r in timeline} & {"prefill", "mixed"}
    assert all(0 <= r["t"] <= run["duration_s"] for r in timeline)

    # A two-run search: both rates meet the generous SLOs, so the goodput is the higher one (a lower bound).
    out = tmp_path / "search.json"
    searched = bench(
        *common,
        *slos,
        "--search",
        "--search-start",
        "2",
        "--max-runs",
        "2",
        "--duration",
        "1",
        "--json",
        str(out),
    )
    assert searched.returncode == 0, searched.stderr
    document = json.loads(out.read_text())
    assert [r["rate"] for r in document["runs"]] == [2.0, 4.0]
    for run in document["runs"]:
        check_exact(run)
    assert document["goodput_rps"] == 4.0 and document["attainment"] == 1.0
    assert document["search"]["bracketed"] is False
    assert "Goodput at attainment ≥ 0.9: 4.000 req/s" in searched.stdout
