"""A whole ecoserve cluster for end-to-end tests: the real coordinator, instance and router processes, on
the session's real nats-server and redis-server, with a tiny model. Nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from services.coordinator.admin_api import endpoint_subject
from shared.messages import AdminReply, AdminRequest, decode_reply
from shared.wire import encode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterProcesses:
    def __init__(self, nats_url: str, redis_url: str, prefix: str, model_dir: Path, log_dir: Path):
        self.nats_url, self.redis_url, self.prefix = nats_url, redis_url, prefix
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.router_port = free_port()
        self.url = f"http://127.0.0.1:{self.router_port}"

    def _common(self) -> list[str]:
        return ["--nats-url", self.nats_url, "--redis-url", self.redis_url, "--prefix", self.prefix]

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = proc
        return proc

    def start_coordinator(self, name: str = "coordinator", *extra: str) -> subprocess.Popen:
        return self._spawn(name, ["services.coordinator", *self._common(), "--lease-seconds", "2", *extra])

    def start_instance(self, instance_id: str, *extra: str) -> subprocess.Popen:
        argv = [
            "services.instance",
            *self._common(),
            "--instance-id",
            instance_id,
            "--model",
            str(self.model_dir),
            "--dtype",
            "float32",
            "--threads",
            "1",
            "--heartbeat-interval",
            "0.2",
            "--drain-timeout",
            "5",
            *extra,
        ]
        return self._spawn(instance_id, argv)

    def start_router(self, name: str = "router", port: int | None = None, *extra: str) -> str:
        port = port or self.router_port
        self._spawn(
            name,
            [
                "services.router",
                *self._common(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                str(self.model_dir),
                *extra,
            ],
        )
        return f"http://127.0.0.1:{port}"

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def signal(self, name: str, sig: int) -> None:
        self.processes[name].send_signal(sig)

    def stop(self, name: str, timeout: float = 20.0) -> int | None:
        proc = self.processes.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for name in sorted(self.processes, key=lambda n: (not n.startswith("router"), n.startswith("coord"))):
            self.stop(name)

    async def admin(self, nc, command: str, **args) -> dict:
        msg = await nc.request(
            endpoint_subject(self.prefix, command),
            encode(AdminRequest(command=command, args=args)),
            timeout=5,
        )
        reply = decode_reply(msg.data, AdminReply)
        assert reply.ok, reply.error
        return reply.result

    async def wait_ready_instances(self, nc, count: int, timeout: float = 120.0) -> list[dict]:
        """Until the coordinator lists `count` dispatchable instances (model loaded, registered, ready)."""
        deadline = time.monotonic() + timeout
        last: list[dict] = []
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(Exception):
                last = (await self.admin(nc, "instances"))["instances"]
                if sum(1 for i in last if i.get("dispatchable")) >= count:
                    return last
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{count} ready instances not seen in {timeout}s: {last}\n" + self.logs())

    async def wait_router(self, url: str | None = None, timeout: float = 60.0) -> None:
        url = url or self.url
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"router at {url} not healthy in {timeout}s\n" + self.logs())

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log(name)}")

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)}" for name in self.processes)
