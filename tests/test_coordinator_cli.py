"""`python -m services.coordinator` as a process, administered with the `ecoserve admin` CLI as a process."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from coordinator_support import (
    FakeInstance,
    admin,
    eventually,
    instance_view,
    spawn_coordinator,
    wait_serving,
)
from nats.aio.client import Client as NATS

from services.infra.embedded import EmbeddedServer

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
        assert "max_waiting_per_instance=64" in out

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
