"""FuDG roles over real NATS with real engines: a prefill instance streams the first token, ships the KV in
KvChunks, and the decode instance continues the stream; tokens equal a single engine's, `seq` numbers are
contiguous, transfers are reported, and no KV block leaks on either side.

`Host` below is the smallest implementation of `FudgHost` (the hook the instance service provides): it
holds dispatched and adopted requests and publishes each engine step's outputs as TokenChunks.
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.client import Client as NATS

from services.instance.engine.async_engine import AsyncEngine
from services.instance.engine.attention import ATTENTION_NAME
from services.instance.engine.llm_engine import EngineConfig, EngineStats, LLMEngine, RequestOutput
from services.instance.engine.sampling_params import SamplingParams
from services.instance.fudg import DecodeRole, PrefillRole
from services.instance.models.loader import load_model
from services.instance.token_stream import ChunkBuilder
from shared import subjects
from shared.kv_messages import CHUNK_OVERHEAD, KvTransferReport
from shared.messages import AbortRequest, DispatchRequest, TokenChunk, decode_token_chunks
from shared.wire import decode, encode

PROMPTS = [list(range(300, 341)), [5, 17, 300, 41, 9, 77], list(range(1000, 1019))]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(tiny_models["mistral"], dtype="float32", attn_implementation=ATTENTION_NAME)


class Host:
    """A minimal instance service for the roles: dispatch, adopt, fail, publish outputs."""

    def __init__(self, instance_id: str, prefix: str, engine: AsyncEngine, nc: NATS):
        self.instance_id = instance_id
        self.prefix = prefix
        self.engine = engine
        self._nc = nc
        self.held: dict[str, tuple[DispatchRequest, ChunkBuilder]] = {}
        self.prefill: PrefillRole | None = None
        self.accepting = True
        self._offset = time.time() - engine.clock()
        self._tasks: set[asyncio.Task] = set()
        engine.add_step_listener(self._on_step)

    @property
    def nc(self) -> NATS:
        return self._nc

    def to_unix(self, engine_time: float) -> float:
        return engine_time + self._offset

    def from_unix(self, unix_time: float) -> float:
        return unix_time - self._offset

    def adopt(self, request: DispatchRequest, builder: ChunkBuilder) -> None:
        if request.request_id in self.held:
            raise ValueError(f"{request.request_id} is already held")
        self.held[request.request_id] = (request, builder)

    def fail(self, request_id: str, message: str) -> None:
        if request_id not in self.held:
            return
        request, builder = self.held.pop(request_id)
        self._spawn(self._nc.publish(request.reply_subject, encode(builder.error(message))))

    def dispatch(self, request: DispatchRequest) -> None:
        builder = ChunkBuilder(request.request_id, len(request.prompt_token_ids), self.to_unix)
        self.adopt(request, builder)
        params = SamplingParams.from_dict(request.sampling)
        self.engine.add_request(request.request_id, request.prompt_token_ids, params)
        if self.prefill is not None:
            self.prefill.track(request, builder)

    def _on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        for out in outputs:
            entry = self.held.get(out.request_id)
            if entry is None:
                continue
            request, builder = entry
            if out.finished:
                del self.held[out.request_id]
            if out.kv_payload is not None:
                assert self.prefill is not None and self.prefill.on_transferred(out)
            else:
                self._spawn(self._nc.publish(request.reply_subject, encode(builder.from_output(out))))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        if self.prefill is not None:
            await self.prefill.wait_idle()
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


def engine_of(model, **config) -> AsyncEngine:
    return AsyncEngine(LLMEngine(model, {0}, EngineConfig(**config)))


def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = LLMEngine(model, {0}, EngineConfig())
    engine.add_request("ref", prompt, params)
    got: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got += out.new_token_ids
    return got


def request_of(prefix: str, rid: str, prompt: list[int], params: SamplingParams) -> DispatchRequest:
    return DispatchRequest(
        request_id=rid,
        model="tiny",
        prompt_token_ids=prompt,
        sampling=params.to_dict(),
        reply_subject=subjects.router_tokens(prefix, "router-0"),
        router_id="router-0",
        arrival_time=time.time(),
        stream=True,
        instance_id="prefill-0",
        dispatch_time=time.time(),
    )


class Cluster:
    def __init__(self, url: str, prefix: str, model, *, max_message_bytes: int | None, decode_for: str):
        self.url, self.prefix, self.model = url, prefix, model
        self.max_message_bytes, self.decode_for = max_message_bytes, decode_for
        self.chunks: dict[str, list[TokenChunk]] = {}
        self.reports: list[KvTransferReport] = []
        self.done: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> Cluster:
        self.ncs = [await nats.connect(self.url, allow_reconnect=False) for _ in range(3)]
        router, p_nc, d_nc = self.ncs
        await router.subscribe(subjects.router_tokens(self.prefix, "router-0"), cb=self._on_chunk)
        await router.subscribe(subjects.kv_transfers(self.prefix), cb=self._on_report)
        self.p_engine = engine_of(self.model, block_size=4, kv_export=True, max_num_batched_tokens=32)
        self.d_engine = engine_of(self.model, block_size=16)
        self.p_engine.start()
        self.d_engine.start()
        self.p_host = Host("prefill-0", self.prefix, self.p_engine, p_nc)
        self.d_host = Host("decode-0", self.prefix, self.d_engine, d_nc)
        self.prefill = self.p_host.prefill = PrefillRole(
            self.p_host, route=lambda r: self.decode_for, max_message_bytes=self.max_message_bytes
        )
        self.decode = DecodeRole(self.d_host)
        await self.decode.start()
        for nc in self.ncs:
            await nc.flush()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.p_engine.shutdown()
        await self.d_engine.shutdown()
        for nc in self.ncs:
            await nc.close()

    async def _on_chunk(self, msg) -> None:
        for chunk in decode_token_chunks(msg.data):
            self.chunks.setdefault(chunk.request_id, []).append(chunk)
            if chunk.finished:
                self.done.setdefault(chunk.request_id, asyncio.Event()).set()

    async def _on_report(self, msg) -> None:
        self.reports.append(decode(msg.data, KvTransferReport))

    async def run(
        self, requests: list[DispatchRequest], timeout: float = 60.0
    ) -> dict[str, list[TokenChunk]]:
        for r in requests:
            self.done.setdefault(r.request_id, asyncio.Event())
            self.p_host.dispatch(r)
        await asyncio.wait_for(asyncio.gather(*(self.done[r.request_id].wait() for r in requests)), timeout)
        await self.p_host.settle()
        await self.d_host.settle()
        await self.ncs[0].flush()
        return self.chunks

    async def assert_all_blocks_free(self) -> None:
        for engine in (self.p_engine, self.d_engine):
            stats = await engine.call(lambda e: e.stats())
            assert (
                stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == stats.num_waiting == 0
            )
        assert not self.p_host.held and not self.d_host.held


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    seqs = [c.seq for c in chunks]
    assert sorted(seqs) == list(range(len(chunks))), f"seq numbers not contiguous: {seqs}"
    ordered = sorted(chunks, key=lambda c: c.seq)
    assert [c.finished for c in ordered] == [False] * (len(chunks) - 1) + [True]
    assert len({c.first_token_time for c in ordered}) == 1 and ordered[0].first_token_time is not None
    assert ordered[-1].completion_tokens == sum(len(c.token_ids) for c in ordered)
    return [t for c in ordered for t in c.token_ids]


@pytest.mark.parametrize("max_message_bytes", [16 * 1024, None], ids=["16KiB", "server-max"])
async def test_prefill_ships_kv_and_decode_continues(nats_server, ecoserve_prefix, model, max_message_bytes):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [request_of(ecoserve_prefix, f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
    async with Cluster(
        nats_server.url, ecoserve_prefix, model, max_message_bytes=max_message_bytes, decode_for="decode-0"
    ) as cluster:
        chunks = await cluster.run(requests)
        for r, prompt in zip(requests, PROMPTS, strict=True):
            got = chunks[r.request_id]
            assert tokens_of(got) == reference(model, prompt, params), r.request_id
            assert max(c.seq for c in got) == MAX_TOKENS - 1 and got[-1].finish_reason == "length"
        assert cluster.decode.imported == len(PROMPTS) and cluster.decode.recomputed == 0
        stats = await cluster.d_engine.call(lambda e: e.stats())
        assert stats.prefill_tokens_total == 0, "the decode instance recomputed a prompt"
        await cluster.assert_all_blocks_free()
        reports = {r.request_id: r for r in cluster.reports}
        bytes_per_token = cluster.p_engine.engine.kv_cache.geometry.bytes_per_token()
        for r, prompt in zip(requests, PROMPTS, strict=True):
            report = reports[r.request_id]
            assert report.accepted and report.decode_instance_id == "decode-0"
            assert report.num_tokens == len(prompt) and report.kv_bytes == len(prompt) * bytes_per_token
            assert report.wire_bytes > report.kv_bytes
            assert report.transfer_seconds >= report.import_seconds > 0
            if max_message_bytes is not None:
                # Full chunks but the last: as few NATS messages as the limit allows.
                piece = max_message_bytes - CHUNK_OVERHEAD
                assert (
                    (report.num_chunks - 1) * piece
                    < report.wire_bytes
                    <= report.num_chunks * max_message_bytes
                )
        assert cluster.prefill.totals.transfers == len(PROMPTS)


async def test_seeded_sampling_survives_the_network(nats_server, ecoserve_prefix, model):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    request = request_of(ecoserve_prefix, "s", PROMPTS[0], params)
    async with Cluster(
        nats_server.url, ecoserve_prefix, model, max_message_bytes=None, decode_for="decode-0"
    ) as cluster:
        chunks = await cluster.run([request])
        assert tokens_of(chunks["s"]) == reference(model, PROMPTS[0], params)
        await cluster.assert_all_blocks_free()


@pytest.mark.parametrize("decode_for", ["decode-9", "decode-0"], ids=["nobody-listening", "draining"])
async def test_refused_transfer_decodes_on_the_prefill_instance(
    nats_server, ecoserve_prefix, model, decode_for
):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    request = request_of(ecoserve_prefix, "lone", PROMPTS[1], params)
    async with Cluster(
        nats_server.url, ecoserve_prefix, model, max_message_bytes=None, decode_for=decode_for
    ) as cluster:
        cluster.d_host.accepting = False
        chunks = await cluster.run([request])
        assert tokens_of(chunks["lone"]) == reference(model, PROMPTS[1], params)
        assert cluster.prefill.totals.refused == 1 and cluster.decode.imported == 0
        assert [r.accepted for r in cluster.reports] == [False]
        await cluster.assert_all_blocks_free()


@pytest.mark.parametrize("when", ["after-import", "during-transfer"])
async def test_abort_is_forwarded_to_the_decode_instance(nats_server, ecoserve_prefix, model, when):
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    request = request_of(ecoserve_prefix, "long", PROMPTS[2], params)
    async with Cluster(
        nats_server.url, ecoserve_prefix, model, max_message_bytes=None, decode_for="decode-0"
    ) as cluster:
        aborted: list[AbortRequest] = []

        async def on_abort(msg) -> None:  # what the decode service's abort handler would do
            abort = decode(msg.data, AbortRequest)
            aborted.append(abort)
            for rid in abort.request_ids:
                cluster.d_engine.abort(rid)
                request, builder = cluster.d_host.held.pop(rid)
                await cluster.ncs[2].publish(request.reply_subject, encode(builder.error("aborted")))

        await cluster.ncs[2].subscribe(subjects.instance_abort(ecoserve_prefix, "decode-0"), cb=on_abort)
        await cluster.ncs[2].flush()
        cluster.done["long"] = asyncio.Event()
        if when == "during-transfer":
            forwarded: list[list[str]] = []

            def abort_now(outputs, stats) -> None:  # runs right after the host started the hand-off
                if any(o.kv_payload is not None for o in outputs):
                    assert "long" in cluster.prefill._in_flight
                    task = asyncio.ensure_future(cluster.prefill.forward_aborts(["long"], "client left"))
                    task.add_done_callback(lambda t: forwarded.append(t.result()))

            cluster.p_engine.add_step_listener(abort_now)
        cluster.p_host.dispatch(request)
        while cluster.decode.imported == 0:
            await asyncio.sleep(0.01)
        if when == "after-import":
            assert await cluster.prefill.forward_aborts(["long", "unknown"], "client left") == ["long"]
        else:
            assert forwarded == [["long"]]
        await asyncio.wait_for(cluster.done["long"].wait(), 30)
        assert [a.request_ids for a in aborted] == [["long"]]
        assert 1 < len(cluster.chunks["long"]) < 400
        await asyncio.sleep(0.1)  # the engine applies the abort before its next step
        await cluster.assert_all_blocks_free()
