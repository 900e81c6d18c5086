"""`ecoserve up`: everything starts from embedded defaults, serves a completion, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from cluster_support import free_port


def test_up_serves_and_stops_cleanly_on_ctrl_c(tiny_models, tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
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
            "--instances",
            "1",
            "--threads-per-instance",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        info = None
        while time.monotonic() < deadline and info is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, (tmp_path / "up.log").read_text()
            if line.startswith("{"):
                info = json.loads(line)
        assert info is not None and info["url"] == f"http://127.0.0.1:{port}"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 5, "nats, redis, coordinator, instance, router"
        body = json.dumps({"model": tiny_models["llama"].name, "prompt": "x = ", "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"{info['url']}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            result = json.load(response)
        assert result["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], (
        "left processes"
    )


def _plan(*flags: str):
    import argparse

    from services.launcher import add_up_args, plan_children

    parser = argparse.ArgumentParser()
    add_up_args(parser)
    args = parser.parse_args(["--instances", "2", *flags])
    return args, plan_children(args, "nats://n", "redis://r", "/models/m")


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_strategies_set_the_instance_policy_and_the_coordinator_dispatch():
    for strategy, policy, dispatch in (
        ("padg", "padg", "padg"),
        ("nodg", "nodg", "least_loaded"),
        ("sarathi", "sarathi", "least_loaded"),
    ):
        _, children = _plan("--strategy", strategy, "--ttft-slo", "2.5", "--tpot-slo", "0.05")
        coordinator, *instances, router = children
        assert _flag(coordinator.argv, "--dispatch-policy") == dispatch
        assert (_flag(coordinator.argv, "--ttft-slo"), _flag(coordinator.argv, "--tpot-slo")) == (
            "2.5",
            "0.05",
        )
        assert [_flag(i.argv, "--policy") for i in instances] == [policy, policy]
        assert router.name == "router"


def test_bad_instance_counts_and_slos_are_refused_before_starting_anything(capsys):
    from services.launcher import main

    assert main(["--strategy", "fudg", "--instances", "1"]) == 2
    assert "at least 2 instances" in capsys.readouterr().err
    assert main(["--strategy", "fudg", "--fudg-split", "1:2", "--instances", "2"]) == 2
    assert "--instances is 2" in capsys.readouterr().err
    assert main(["--strategy", "padg", "--ttft-slo", "0"]) == 2
    assert "--ttft-slo" in capsys.readouterr().err
    assert main(["--instances", "0"]) == 2
    assert "--instances" in capsys.readouterr().err


def test_fudg_split_defaults_to_half_prefill_rounded_up():
    from services.launcher import fudg_split

    assert fudg_split(None, None) == (1, 1)
    assert [fudg_split(n, None) for n in (2, 3, 4, 5)] == [(1, 1), (2, 1), (2, 2), (3, 2)]
    assert fudg_split(None, "1:3") == (1, 3) and fudg_split(4, "3:1") == (3, 1)
    for instances, split, message in (
        (1, None, "at least 2 instances"),
        (None, "2", "P:D"),
        (None, "a:b", "P:D"),
        (None, "0:2", "at least one prefill"),
        (None, "1:0", "at least one prefill"),
        (3, "1:1", "--instances is 3"),
    ):
        with pytest.raises(ValueError, match=message):
            fudg_split(instances, split)


def test_fudg_plan_gives_instances_their_roles():
    import argparse

    from services.launcher import add_up_args, plan_children

    parser = argparse.ArgumentParser()
    add_up_args(parser)
    args = parser.parse_args(["--strategy", "fudg", "--fudg-split", "2:1"])
    coordinator, *instances, router = plan_children(args, "nats://n", "redis://r", "/models/m")
    assert _flag(coordinator.argv, "--dispatch-policy") == "fudg"
    assert [_flag(i.argv, "--fudg-role") for i in instances] == ["prefill", "prefill", "decode"]
    assert {_flag(i.argv, "--policy") for i in instances} == {"nodg"}
    assert router.name == "router"
    # Other strategies start role-less instances (one by default).
    _, children = _plan("--strategy", "nodg")
    assert not any("--fudg-role" in c.argv for c in children)
