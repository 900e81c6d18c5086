"""FuDG through two real instance services over NATS: the prefill instance streams the first token and ships
the KV, the decode instance continues the stream; an abort sent to the prefill instance reaches the decode
instance; no KV block leaks; the decode instance's status reports list the request it adopted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from instance_support import (
    ENDLESS,
    GREEDY,
    PROMPTS,
    Peer,
    assert_well_formed,
    collect,
    make_engine,
    next_message,
    reference_tokens,
    token_ids,
    wait_status,
)

from services.instance.engine.async_engine import AsyncEngine
from services.instance.engine.attention import ATTENTION_NAME
from services.instance.fudg import DecodeRole, PrefillRole
from services.instance.models.loader import load_model
from services.instance.service import InstanceService
from shared import subjects
from shared.config import InstanceConfig
from shared.kv_messages import KvTransferReport
from shared.messages import AbortRequest, DispatchAck, TokenChunk
from shared.wire import encode


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(tiny_models["mistral"], dtype="float32", attn_implementation=ATTENTION_NAME)


@contextlib.asynccontextmanager
async def fudg_pair(
    model, nats_server, prefix: str
) -> AsyncIterator[tuple[InstanceService, InstanceService]]:
    def service(instance_id: str, **engine_config) -> InstanceService:
        config = InstanceConfig(
            nats_url=nats_server.url, prefix=prefix, instance_id=instance_id, heartbeat_interval=0.05
        )
        engine = AsyncEngine(make_engine(model, **engine_config))
        return InstanceService(config, engine, "tiny", register_interval=0.1)

    prefill = service("prefill-0", kv_export=True, block_size=4)
    decode = service("decode-0", block_size=16)
    prefill.fudg_prefill = PrefillRole(prefill, route=lambda request: "decode-0")
    decode.fudg_decode = DecodeRole(decode)
    await decode.start()
    await prefill.start()
    try:
        await asyncio.wait_for(asyncio.gather(prefill.registered.wait(), decode.registered.wait()), 10)
        yield prefill, decode
    finally:
        await asyncio.wait_for(asyncio.gather(prefill.stop(), decode.stop()), 30)


async def test_two_services_serve_a_request_together(model, nats_server, nats_client, ecoserve_prefix):
    peer = Peer(nats_client, ecoserve_prefix, "prefill-0")
    await peer.answer_registrations()
    prompts = {str(i): p for i, p in enumerate(PROMPTS)}
    expected = reference_tokens(model, prompts, GREEDY)
    reports = await peer.subscribe(subjects.kv_transfers(ecoserve_prefix))
    decode_status = await peer.subscribe(subjects.status(ecoserve_prefix, "decode-0"))
    async with fudg_pair(model, nats_server, ecoserve_prefix) as (prefill, decode):
        roles = {r.info.instance_id: r.info.role for r in peer.registrations}
        assert roles == {"prefill-0": "prefill", "decode-0": "decode"}  # announced to the coordinator
        tokens = await peer.tokens()
        started = time.time()
        for rid, prompt in prompts.items():
            assert isinstance(await peer.dispatch(rid, prompt, GREEDY), DispatchAck)
        chunks = await collect(tokens, set(prompts))
        for rid, want in expected.items():
            got = chunks[rid]
            assert_well_formed(got)
            assert token_ids(got) == want, rid
            assert [c.completion_tokens for c in got] == list(range(1, len(want) + 1))
            assert len({c.first_token_time for c in got}) == 1 and started <= got[0].first_token_time
        seen = [await next_message(reports) for _ in prompts]
        assert all(isinstance(r, KvTransferReport) and r.accepted for r in seen)
        assert {r.request_id for r in seen} == set(prompts)
        # The decode instance listed the adopted requests; both end idle with every block free.
        await wait_status(decode_status, lambda s: not s.requests and s.num_running == 0)
        for service in (prefill, decode):
            stats = await service.engine.call(lambda e: e.stats())
            assert stats.kv_blocks_free == stats.kv_blocks_total, service.instance_id
        assert (await decode.engine.call(lambda e: e.stats())).prefill_tokens_total == 0


async def test_abort_at_the_prefill_instance_reaches_the_decode_instance(
    model, nats_server, nats_client, ecoserve_prefix
):
    peer = Peer(nats_client, ecoserve_prefix, "prefill-0")
    await peer.answer_registrations()
    async with fudg_pair(model, nats_server, ecoserve_prefix) as (_, decode):
        tokens = await peer.tokens()
        assert isinstance(await peer.dispatch("long", PROMPTS[2], ENDLESS), DispatchAck)
        for _ in range(5):  # decoding on the decode instance by now
            chunk = await next_message(tokens)
            assert isinstance(chunk, TokenChunk) and not chunk.finished
        abort = AbortRequest(request_ids=["long"], reason="client left")
        await peer.nc.publish(subjects.instance_abort(ecoserve_prefix, "prefill-0"), encode(abort))
        while not (chunk := await next_message(tokens)).finished:
            pass
        assert chunk.finish_reason == "abort"
        await asyncio.sleep(0.2)  # the engine frees the blocks before its next step
        stats = await decode.engine.call(lambda e: e.stats())
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0
