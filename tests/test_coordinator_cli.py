"""`python -m services.coordinator` as a process, administered with the `ecoserve admin` CLI as a process."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import pytest
from coordinator_support import (
    FakeInstance,
    admin,
    eventually,
    instance_view,
    spawn_coordinator,
    wait_serving,
)
from nats.aio.client import Client as NATS

from services.coordinator.admin_cli import AdminCallError, configure, render, request_for
from services.infra.embedded import EmbeddedServer
from shared.messages import AdminRequest

CLI = [sys.executable, "-m", "services.coordinator.admin_cli"]


async def run_cli(nats_url: str, prefix: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "--nats-url",
        nats_url,
        "--prefix",
        prefix,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_admin_cli_against_a_coordinator_process(
    nats_server: EmbeddedServer, redis_server: EmbeddedServer, nats_client: NATS, ecoserve_prefix: str
) -> None:
    prefix = ecoserve_prefix
    coordinator = await spawn_coordinator(nats_server.url, redis_server.url, prefix, "cli-coord")
    try:
        await wait_serving(nats_client, prefix)
        instance = FakeInstance(nats_client, prefix, "inst-a")
        await instance.start()
        await instance.report(running=2, waiting=1)

        async def reported() -> bool:
            view = await instance_view(nats_client, prefix, "inst-a")
            return view is not None and view["num_running"] == 2

        await eventually(reported)

        code, out, err = await run_cli(nats_server.url, prefix, "status")
        assert code == 0, err
        assert "coordinator cli-coord (leader)" in out
        assert "macro instance m0: inst-a" in out
        header, row = out.splitlines()[3:5]
        assert header.split()[:2] == ["#", "INSTANCE"]
        assert row.split()[:7] == ["1", "inst-a", "m0", "ready", "ready", "2", "1"]
        assert "max_waiting_per_instance=1024" in out

        code, out, err = await run_cli(nats_server.url, prefix, "config", "max_waiting_per_instance=5")
        assert code == 0, err
        assert "max_waiting_per_instance = 5" in out
        current = (await admin(nats_client, prefix, "config-get")).result["config"]
        assert current["max_waiting_per_instance"] == 5

        code, out, err = await run_cli(nats_server.url, prefix, "--json", "instances")
        assert code == 0, err
        (listed,) = json.loads(out)["instances"]
        assert (listed["instance_id"], listed["num_running"], listed["num_waiting"]) == ("inst-a", 2, 1)

        code, out, err = await run_cli(nats_server.url, prefix, "drain", "inst-a")
        assert code == 0, err
        assert "inst-a: draining (instance acknowledged)" in out
        assert [c.command for c in instance.controls] == ["drain"]

        for args, problem in (
            (["config", "bogus=1"], "bogus"),
            (["config", "lease_seconds=-2"], "lease_seconds"),
            (["resume", "inst-nope"], "unknown instance 'inst-nope'"),
        ):
            code, out, err = await run_cli(nats_server.url, prefix, *args)
            assert code == 1 and problem in err, (args, err)

        code, _, err = await run_cli(nats_server.url, prefix + "x", "--timeout", "0.5", "status")
        assert code == 1 and "no coordinator answered" in err
    finally:
        if coordinator.returncode is None:
            coordinator.send_signal(signal.SIGTERM)
        _, log = await asyncio.wait_for(coordinator.communicate(), 10)
    assert coordinator.returncode == 0, log.decode()


# ---- mitosis scaling commands: parsing and rendering (no servers) ----


def _parsed(*argv: str) -> AdminRequest:
    return request_for(configure(argparse.ArgumentParser()).parse_args(list(argv)))


def test_scaling_commands_parse_into_admin_requests() -> None:
    assert _parsed("add-instance") == AdminRequest(command="add-instance", args={})
    assert _parsed("add-instance", "s1", "--macro", "m2") == AdminRequest(
        command="add-instance", args={"instance_id": "s1", "macro_instance_id": "m2"}
    )
    assert _parsed("remove-instance", "i3") == AdminRequest(
        command="remove-instance", args={"instance_id": "i3"}
    )
    assert _parsed("scaling") == AdminRequest(command="scaling-get")
    assert _parsed("scaling", "enabled=on", "hold=2.5") == AdminRequest(
        command="scaling-set", args={"enabled": "on", "hold": "2.5"}
    )
    with pytest.raises(AdminCallError, match="KEY=VALUE"):
        _parsed("scaling", "enabled")
    with pytest.raises(SystemExit):
        _parsed("remove-instance")  # the instance is required


SCALING_VIEW: dict[str, Any] = {
    "enabled": True,
    "settings": {
        "enabled": True,
        "window": 30.0,
        "min_samples": 8,
        "hold": 10.0,
        "cooldown": 60.0,
        "macro_choice": "size_weighted",
        "n_lower": 3,
        "n_upper": 6,
        "ttft_slo": 1.0,
    },
    "macro_instances": [{"macro_instance_id": "m0", "members": ["a", "b", "c"]}],
    "spares": ["s0", "s1"],
    "draining": ["d0"],
    "signals": {
        "mean_ttft": 1.25,
        "slack_ratio": "inf",
        "overloaded": True,
        "over_provisioned": False,
        "cooling_down": True,
    },
}
SPLIT_EVENT: dict[str, Any] = {
    "event_id": "1-0",
    "time": 1_790_000_000.0,  # 2026-09-21 14:13:20 UTC
    "action": "split",
    "cause": "expand",
    "macros": ["m0", "m1"],
    "instances": ["e", "f", "g"],
    "reason": "m0 exceeded N_u=6",
    "mean_ttft": 1.5,
    "slack_ratio": None,
}


def test_status_shows_spares_signals_and_the_last_scaling_events() -> None:
    result = {
        "coordinator_id": "c1",
        "leader": True,
        "inflight_requests": 0,
        "macro_instances": [{"macro_instance_id": "m0", "members": ["a", "b", "c"]}],
        "instances": [],
        "config": {"dispatch_policy": "padg"},
        "scaling": SCALING_VIEW,
        "scaling_events": [SPLIT_EVENT],
    }
    lines = render(AdminRequest(command="status"), result)
    assert lines[1] == "macro instance m0: a, b, c"
    at = lines.index("config: dispatch_policy=padg") + 2  # the scaling section follows the cluster's
    assert lines[at].startswith("scaling: on (N_l=3 N_u=6 TTFT SLO 1.0s; window 30.0s, hold 10.0s")
    assert lines[at + 1] == "spares: s0, s1; draining: d0"
    assert lines[at + 2] == "signals: mean TTFT 1.250s, saved TPOT inf its bound; overloaded; cooling down"
    header, row = lines[lines.index("recent scaling events:") + 1 :]
    assert header == "TIME (UTC)           ACTION  CAUSE   MACROS   INSTANCES  MEAN TTFT  SLACK  REASON"
    assert (
        row == "2026-09-21 14:13:20  split   expand  m0 → m1  e,f,g      1.500s     -      m0 exceeded N_u=6"
    )
    empty = render(AdminRequest(command="status"), {**result, "scaling_events": []})
    assert empty[-1] == "no scaling events"


def test_scaling_command_results_render() -> None:
    added = render(
        AdminRequest(command="add-instance"),
        {
            "events": [{**SPLIT_EVENT, "action": "add", "macros": ["m0"], "instances": ["s0"]}],
            "scaling": SCALING_VIEW,
        },
    )
    assert added == ["add s0 (m0): expand, m0 exceeded N_u=6", "spares: s0, s1; draining: d0"]
    shown = render(AdminRequest(command="scaling-set"), {"scaling": SCALING_VIEW, "changed": ["enabled"]})
    assert shown[0] == "set enabled" and "macro instance m0: a, b, c" in shown
    assert shown[shown.index("") + 1 :][:2] == ["enabled = on", "window = 30.0"]


def test_a_bad_scheduling_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from services.coordinator.__main__ import main

    assert main(["--dispatch-policy", "fastest"]) == 2
    assert "dispatch_policy" in capsys.readouterr().err
    assert main(["--n-lower", "4", "--n-upper", "5"]) == 2
    assert "n_lower" in capsys.readouterr().err


def test_status_shows_the_prefill_window_of_a_padg_macro_instance() -> None:
    padg = {
        "macro_instance_id": "m0",
        "members": ["a", "b"],
        "policy": "padg",
        "active": "b",
        "window_epoch": 7,
        "pending": 2,
        "windows_opened": {"a": 3, "b": 4},
    }
    plain = {"macro_instance_id": "m1", "members": ["c"], "policy": "least_loaded"}
    result = {
        "coordinator_id": "c1",
        "leader": True,
        "inflight_requests": 0,
        "macro_instances": [padg, plain],
        "instances": [],
        "config": {"dispatch_policy": "padg"},
    }
    lines = render(AdminRequest(command="status"), result)
    assert lines[1] == (
        "macro instance m0: a, b — prefill window: b (epoch 7), pending 2; windows opened: a 3, b 4"
    )
    assert lines[2] == "macro instance m1: c"
