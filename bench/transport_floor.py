"""The transport floor of a served request's TTFT: the HTTP and NATS hops of ecoserve's path, doing no work.

ecoserve's first token travels client → router (HTTP), router → coordinator → instance (NATS), instance →
router (NATS), router → client (SSE). This module runs stand-ins that only move bytes, on the benchmark's own
nats-server, so `bench/overhead.py` can measure in the same run how much of the added TTFT any implementation
of that topology pays on this machine:
  http  an aiohttp server (uvloop, as the router) whose POST handler reads the body and answers with one SSE
        event; with --hops it first sends the body around a ring of NATS relays and waits for it to return;
  relay subscribes to one subject and republishes each message, unchanged, on the next one.
With two relays the ring is the served path's three NATS hops (router → "coordinator" → "instance" → router).

    python bench/transport_floor.py relay --nats URL --listen floor.a --forward floor.b
    python bench/transport_floor.py http --nats URL --port 8123 --ring floor.a --back floor.back
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

SSE_EVENT = b'data: {"choices":[{"index":0,"text":"x"}]}\n\n'


async def _relay(nats_url: str, listen: str, forward: str) -> None:
    import nats

    nc = await nats.connect(nats_url)

    async def on_message(msg: Any) -> None:
        await nc.publish(forward, msg.data)

    await nc.subscribe(listen, cb=on_message)
    await nc.flush()
    await asyncio.Event().wait()


async def _http(nats_url: str, port: int, ring: str | None, back: str) -> None:
    import nats
    from aiohttp import web

    nc = await nats.connect(nats_url)
    waiting: dict[bytes, asyncio.Future[None]] = {}

    async def on_back(msg: Any) -> None:
        future = waiting.pop(msg.data, None)
        if future is not None and not future.done():
            future.set_result(None)

    await nc.subscribe(back, cb=on_back)
    await nc.flush()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if ring is not None:
            token = os.urandom(8) + body[:64]
            future = asyncio.get_running_loop().create_future()
            waiting[token] = future
            await nc.publish(ring, token)
            await future
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(SSE_EVENT)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


@dataclass
class FloorServers:
    """The stand-in processes: `bare_url` answers at once, `ring_url` after three NATS hops."""

    bare_url: str
    ring_url: str
    processes: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def start_floor_servers(nats_url: str) -> FloorServers:
    from services.infra.embedded import free_port

    me = [sys.executable, __file__]
    tag = os.urandom(4).hex()
    a, b, back = f"floor.{tag}.a", f"floor.{tag}.b", f"floor.{tag}.back"
    bare_port, ring_port = free_port(), free_port()
    argvs = [
        [*me, "relay", "--nats", nats_url, "--listen", a, "--forward", b],
        [*me, "relay", "--nats", nats_url, "--listen", b, "--forward", back],
        [*me, "http", "--nats", nats_url, "--port", str(bare_port), "--back", f"floor.{tag}.unused"],
        [*me, "http", "--nats", nats_url, "--port", str(ring_port), "--ring", a, "--back", back],
    ]
    processes = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for argv in argvs]
    return FloorServers(f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{ring_port}", processes)


async def first_event_time(session: Any, url: str, payload: dict[str, Any]) -> float:
    """Send → first SSE event, as the benchmark's served requests are timed."""
    sent = time.perf_counter()
    async with session.post(f"{url}/", json=payload) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                first = time.perf_counter()
                await response.read()
                return first - sent
    raise RuntimeError(f"{url} sent no event")


async def wait_ready(session: Any, servers: FloorServers, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for url in (servers.bare_url, servers.ring_url):
        while True:
            try:
                await asyncio.wait_for(first_event_time(session, url, {}), 2.0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def measure_floor(
    session: Any,
    servers: FloorServers,
    payloads: list[dict[str, Any]],
    gap: float,
) -> dict[str, list[float]]:
    """Per payload, one request to each stand-in (alternating which goes first), `gap` s idle before each."""
    await wait_ready(session, servers)
    for _ in range(3):  # connections and first-call costs out of the way
        for url in (servers.bare_url, servers.ring_url):
            await first_event_time(session, url, payloads[0])
    times: dict[str, list[float]] = {"http": [], "http_and_nats": []}
    for i, payload in enumerate(payloads):
        order = [("http", servers.bare_url), ("http_and_nats", servers.ring_url)]
        for key, url in order if i % 2 == 0 else order[::-1]:
            await asyncio.sleep(gap)
            times[key].append(await first_event_time(session, url, payload))
    return times


def _event_loop_run(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="role", required=True)
    relay = sub.add_parser("relay")
    relay.add_argument("--nats", required=True)
    relay.add_argument("--listen", required=True)
    relay.add_argument("--forward", required=True)
    http = sub.add_parser("http")
    http.add_argument("--nats", required=True)
    http.add_argument("--port", type=int, required=True)
    http.add_argument("--ring", default=None)
    http.add_argument("--back", required=True)
    args = parser.parse_args(argv)
    if args.role == "relay":
        _event_loop_run(_relay(args.nats, args.listen, args.forward))
    else:
        _event_loop_run(_http(args.nats, args.port, args.ring, args.back))


if __name__ == "__main__":
    main()
