"""The test's side of an instance's wire (playing the coordinator and the router) over real NATS, and an
instance service running a tiny model, shared by the instance service tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from services.instance.engine.async_engine import AsyncEngine
from services.instance.engine.llm_engine import EngineConfig, LLMEngine, eos_token_ids_of
from services.instance.engine.sampling_params import SamplingParams
from services.instance.service import InstanceService
from shared import subjects
from shared.config import InstanceConfig
from shared.messages import (
    ControlCommand,
    DispatchRequest,
    InstanceControl,
    InstanceStatus,
    PrefillWindow,
    RegisterAck,
    RegisterInstance,
    TokenChunk,
    decode_token_chunks,
)
from shared.wire import Message, decode, encode

INSTANCE = "inst-1"
ROUTER = "router-1"
PROMPTS = [[5, 17, 300, 41, 9, 77], [400, 12, 13, 14], list(range(100, 140))]
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
ENDLESS = {"max_tokens": 100_000, "temperature": 0.0, "ignore_eos": True}


def make_engine(model, **config: Any) -> LLMEngine:
    return LLMEngine(model, eos_token_ids_of(model), EngineConfig(num_kv_blocks=64, **config))


def reference_tokens(model, prompts: dict[str, list[int]], sampling: dict[str, Any]) -> dict[str, list[int]]:
    """Each prompt's tokens from the engine alone (no service, no NATS)."""
    engine = make_engine(model)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(**sampling))
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


class Peer:
    """The test's side of the wire: answers registrations, sends dispatches and controls, reads reports."""

    def __init__(self, nc: NATS, prefix: str, instance_id: str = INSTANCE):
        self.nc = nc
        self.prefix = prefix
        self.instance_id = instance_id
        self.registrations: list[RegisterInstance] = []

    async def answer_registrations(self, *, refuse_first: int = 0, macro: str = "m0") -> Subscription:
        async def answer(msg) -> None:
            self.registrations.append(decode(msg.data, RegisterInstance))
            accepted = len(self.registrations) > refuse_first
            ack = RegisterAck(
                accepted=accepted,
                macro_instance_id=macro if accepted else None,
                lease_seconds=3.0,
                message="welcome" if accepted else "not yet",
            )
            await msg.respond(encode(ack))

        return await self.subscribe(subjects.register(self.prefix), cb=answer)

    async def subscribe(self, subject: str, **kwargs: Any) -> Subscription:
        sub = await self.nc.subscribe(subject, **kwargs)
        await self.nc.flush()  # known to the server before the instance publishes
        return sub

    async def request(self, subject: str, payload: bytes) -> Message:
        reply = await self.nc.request(subject, payload, timeout=10)
        return decode(reply.data)

    async def dispatch(
        self, request_id: str, prompt: list[int], sampling: dict[str, Any], /, **overrides: Any
    ) -> Message:
        fields: dict[str, Any] = {
            "request_id": request_id,
            "model": "tiny",
            "prompt_token_ids": prompt,
            "sampling": sampling,
            "reply_subject": subjects.router_tokens(self.prefix, ROUTER),
            "router_id": ROUTER,
            "arrival_time": time.time(),
            "stream": True,
            "instance_id": self.instance_id,
            "dispatch_time": time.time(),
        }
        fields.update(overrides)
        subject = subjects.instance_requests(self.prefix, self.instance_id)
        return await self.request(subject, encode(DispatchRequest(**fields)))

    async def control(self, command: ControlCommand) -> Message:
        subject = subjects.instance_control(self.prefix, self.instance_id)
        return await self.request(subject, encode(InstanceControl(command=command)))

    async def window(
        self, active: bool, epoch: int, *, ttft_slo: float = 5.0, hold_outputs: bool = False
    ) -> Message:
        """A PrefillWindow on the control subject, as the coordinator sends it."""
        window = PrefillWindow(
            active=active, epoch=epoch, time=time.time(), ttft_slo=ttft_slo, hold_outputs=hold_outputs
        )
        return await self.request(subjects.instance_control(self.prefix, self.instance_id), encode(window))

    async def tokens(self) -> Subscription:
        return await self.subscribe(subjects.router_tokens(self.prefix, ROUTER))

    async def statuses(self) -> Subscription:
        return await self.subscribe(subjects.status(self.prefix, self.instance_id))


async def next_message(sub: Subscription, timeout: float = 30) -> Any:
    return decode((await sub.next_msg(timeout=timeout)).data)


async def collect(
    sub: Subscription, request_ids: set[str], timeout: float = 60
) -> dict[str, list[TokenChunk]]:
    """Chunks per request until each one's terminal chunk (finished or error)."""
    chunks: dict[str, list[TokenChunk]] = {rid: [] for rid in request_ids}
    open_ids = set(request_ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        msg = await sub.next_msg(timeout=deadline - time.monotonic())
        for chunk in decode_token_chunks(msg.data):
            chunks[chunk.request_id].append(chunk)
            if chunk.finished or chunk.error is not None:
                open_ids.discard(chunk.request_id)
    return chunks


async def wait_status(
    sub: Subscription, predicate: Callable[[InstanceStatus], object], timeout: float = 30
) -> InstanceStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = await next_message(sub, deadline - time.monotonic())
        assert isinstance(status, InstanceStatus)
        if predicate(status):
            return status


def assert_well_formed(chunks: list[TokenChunk]) -> None:
    """seq 0..n-1 and exactly one terminal chunk, the last."""
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]


def token_ids(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@contextlib.asynccontextmanager
async def running(
    model,
    nats_server,
    prefix: str,
    engine: AsyncEngine | None = None,
    *,
    profile_prefill: str = "auto",
    drain_timeout: float = 30.0,
    **options: Any,
) -> AsyncIterator[InstanceService]:
    config = InstanceConfig(
        nats_url=nats_server.url,
        prefix=prefix,
        instance_id=INSTANCE,
        heartbeat_interval=0.05,
        profile_prefill=profile_prefill,
        drain_timeout=drain_timeout,
    )
    options.setdefault("register_interval", 0.1)
    service = InstanceService(config, engine or AsyncEngine(make_engine(model)), "tiny", **options)
    await service.start()
    try:
        yield service
    finally:
        await asyncio.wait_for(service.stop(), 30)


@contextlib.asynccontextmanager
async def registered(model, nats_server, nats_client, prefix: str, **options: Any):
    peer = Peer(nats_client, prefix)
    await peer.answer_registrations()
    async with running(model, nats_server, prefix, **options) as service:
        await asyncio.wait_for(service.registered.wait(), 10)
        yield service, peer
