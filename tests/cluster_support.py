"""A whole ecoserve cluster for end-to-end tests: the real coordinator, instance and router processes, on
the session's real nats-server and redis-server, with a tiny model. Nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import nats

from services.coordinator.admin_api import endpoint_subject
from services.infra.embedded import free_port
from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.sampling_params import SamplingParams
from services.instance.models.loader import load_model
from shared.messages import AdminReply, AdminRequest, decode_reply
from shared.wire import encode


async def read_events(response: aiohttp.ClientResponse, count: int, timeout: float = 30.0) -> None:
    """Read `count` SSE data events of a stream, none of them an error."""
    seen = 0
    while seen < count:
        line = (await asyncio.wait_for(response.content.readline(), timeout)).decode().strip()
        if line.startswith("data: "):
            assert "error" not in json.loads(line[6:]), line
            seen += 1


async def final_error(response: aiohttp.ClientResponse) -> dict | None:
    """Read the rest of an SSE stream: its (last) error event, or None when it ended without one."""
    error = None
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            error = json.loads(line[6:]).get("error", error)
    return error


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


@contextlib.asynccontextmanager
async def running_cluster(
    nats_url: str,
    redis_url: str,
    model_dir: Path,
    log_dir: Path,
    name: str,
    start: Callable[[ClusterProcesses], int],
    ready_timeout: float = 120.0,
) -> AsyncIterator[ClusterProcesses]:
    """A cluster under a fresh prefix: `start(procs)` spawns its processes and returns how many instances
    must be ready; yields once they are and the router is healthy (`procs.nc` connected), then stops all."""
    prefix = f"{name}{int(time.time() * 1000) % 10**8}"
    procs = ClusterProcesses(nats_url, redis_url, prefix, model_dir, log_dir)
    nc = await nats.connect(nats_url)
    try:
        instances = start(procs)
        await procs.wait_ready_instances(nc, instances, timeout=ready_timeout)
        await procs.wait_router()
        procs.nc = nc
        yield procs
    finally:
        procs.stop_all()
        await nc.close()


class EngineAlone:
    """The reference a cluster's output is compared with: greedy tokens of the engine alone, one request at a
    time (cached per prompt and limits)."""

    def __init__(self, model_dir: Path):
        self._model = load_model(model_dir, dtype="float32", attn_implementation=ATTENTION_NAME)
        self._cache: dict[tuple, list[int]] = {}

    def __call__(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
        key = (tuple(prompt_ids), max_tokens, ignore_eos)
        if key not in self._cache:
            engine = LLMEngine(self._model, eos_token_ids_of(self._model), EngineConfig())
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
            engine.add_request("r", prompt_ids, params)
            out: list[int] = []
            while engine.has_unfinished_requests():
                for o in engine.step():
                    out.extend(o.new_token_ids)
            self._cache[key] = out
        return self._cache[key]
