"""Test doubles for coordinator tests: wire-message builders, and a scripted instance on real NATS.

The coordinator is only ever talked to over the wire here, exactly as the instance and router services do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError

from services.coordinator.admin_api import endpoint_subject
from services.coordinator.service import CoordinatorService
from services.infra.nats_sync import synced
from shared import subjects
from shared.config import CoordinatorConfig
from shared.messages import (
    AdminReply,
    AdminRequest,
    DeregisterInstance,
    DispatchAck,
    DispatchRequest,
    ErrorReply,
    InstanceControl,
    InstanceInfo,
    InstanceStatus,
    RegisterAck,
    RegisterInstance,
    RequestProgress,
    SubmitRequest,
    decode_reply,
)
from shared.wire import Message, decode, encode


def make_info(instance_id: str, prefix: str = "t", kv_blocks_total: int = 100) -> InstanceInfo:
    return InstanceInfo(
        instance_id=instance_id,
        model="tiny",
        subjects=subjects.instance_subjects(prefix, instance_id),
        kv_blocks_total=kv_blocks_total,
        block_size=16,
        max_model_len=512,
        policy="sarathi",
        pid=1234,
        host="test",
        started_at=1000.0,
    )


def make_status(
    instance_id: str,
    *,
    seq: int = 0,
    running: int = 0,
    waiting: int = 0,
    kv_free: int = 100,
    request_ids: tuple[str, ...] = (),
    state: str = "ready",
) -> InstanceStatus:
    return InstanceStatus(
        instance_id=instance_id,
        seq=seq,
        time=time.time(),
        state=state,  # type: ignore[arg-type]
        phase="idle",
        num_running=running,
        num_waiting=waiting,
        kv_blocks_free=kv_free,
        kv_blocks_total=100,
        num_preemptions=0,
        requests=[
            RequestProgress(request_id=r, prompt_tokens=3, output_tokens=1, arrival_time=time.time())
            for r in request_ids
        ],
    )


def make_submit(request_id: str, reply_subject: str, prompt: list[int] | None = None) -> SubmitRequest:
    return SubmitRequest(
        request_id=request_id,
        model="tiny",
        prompt_token_ids=prompt or [1, 2, 3],
        sampling={"max_tokens": 4},
        reply_subject=reply_subject,
        router_id="router-test",
        arrival_time=time.time(),
        stream=True,
    )


Answer = Callable[[DispatchRequest], Message]


def accept(request: DispatchRequest) -> Message:
    return DispatchAck(request_id=request.request_id, instance_id=request.instance_id, accepted=True)


class FakeInstance:
    """Registers, reports status on demand, answers dispatches with `answer` and control commands with ok."""

    def __init__(self, nc: NATS, prefix: str, instance_id: str, answer: Answer = accept):
        self.nc = nc
        self.prefix = prefix
        self.instance_id = instance_id
        self.answer = answer
        self.info = make_info(instance_id, prefix)
        self.dispatched: list[DispatchRequest] = []
        self.controls: list[InstanceControl] = []
        self.seq = 0
        self._subscriptions: list[Subscription] = []

    async def start(self, *, register: bool = True) -> RegisterAck | None:
        names = self.info.subjects
        self._subscriptions = [
            await self.nc.subscribe(names.requests, cb=self._on_dispatch),
            await self.nc.subscribe(names.control, cb=self._on_control),
        ]
        await synced(self.nc)
        return await self.register() if register else None

    async def register(self) -> RegisterAck:
        reply = await self.nc.request(
            subjects.register(self.prefix), encode(RegisterInstance(info=self.info)), timeout=5
        )
        return decode_reply(reply.data, RegisterAck)

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions = []

    async def report(self, **fields: Any) -> None:
        self.seq += 1
        status = make_status(self.instance_id, seq=self.seq, **fields)
        await self.nc.publish(subjects.status(self.prefix, self.instance_id), encode(status))

    async def deregister(self) -> None:
        goodbye = DeregisterInstance(instance_id=self.instance_id, reason="test")
        await self.nc.publish(subjects.deregister(self.prefix), encode(goodbye))

    async def _on_dispatch(self, msg: Msg) -> None:
        request = decode(msg.data, DispatchRequest)
        self.dispatched.append(request)
        await msg.respond(encode(self.answer(request)))

    async def _on_control(self, msg: Msg) -> None:
        self.controls.append(decode(msg.data, InstanceControl))
        await msg.respond(encode(AdminReply(ok=True)))


def coordinator_config(nats_url: str, redis_url: str, prefix: str, **overrides: Any) -> CoordinatorConfig:
    settings: dict[str, Any] = {"lease_seconds": 3.0, "coordinator_lease_seconds": 1.0} | overrides
    return CoordinatorConfig(nats_url=nats_url, redis_url=redis_url, prefix=prefix, **settings)


@contextlib.asynccontextmanager
async def running(config: CoordinatorConfig) -> AsyncIterator[CoordinatorService]:
    service = CoordinatorService(config)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def submit(nc: NATS, prefix: str, request: SubmitRequest, timeout: float = 10) -> Message:
    """The coordinator's answer (SubmitAck or ErrorReply)."""
    reply = await nc.request(subjects.submit(prefix), encode(request), timeout=timeout)
    return decode(reply.data)


async def admin(nc: NATS, prefix: str, command: str, timeout: float = 5, **args: Any) -> AdminReply:
    request = AdminRequest(command=command, args=args)
    reply = await nc.request(endpoint_subject(prefix, command), encode(request), timeout=timeout)
    answer = decode(reply.data, (AdminReply, ErrorReply))
    assert isinstance(answer, AdminReply), answer
    return answer


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.05
) -> float:
    """Poll until `check()` is true; returns the seconds it took (AssertionError at the timeout)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def spawn_coordinator(
    nats_url: str, redis_url: str, prefix: str, coordinator_id: str, lease: float = 1.0
) -> asyncio.subprocess.Process:
    """`python -m services.coordinator` as a child process (its log on the process's stderr pipe)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.coordinator",
        "--nats-url",
        nats_url,
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        "--coordinator-id",
        coordinator_id,
        "--coordinator-lease-seconds",
        str(lease),
        env={**os.environ, "ECOSERVE_LOG_LEVEL": "WARNING"},
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_serving(nc: NATS, prefix: str, timeout: float = 20) -> None:
    """Until some coordinator answers admin commands for `prefix`."""

    async def serving() -> bool:
        try:
            return (await admin(nc, prefix, "status", timeout=0.5)).ok
        except (NoRespondersError, TimeoutError):
            return False

    await eventually(serving, timeout=timeout)


async def instance_view(nc: NATS, prefix: str, instance_id: str) -> dict[str, Any] | None:
    """The coordinator's summary of one instance (admin `instances`), None if it does not know it."""
    reply = await admin(nc, prefix, "instances")
    return next((i for i in reply.result["instances"] if i["instance_id"] == instance_id), None)
