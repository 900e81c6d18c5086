"""StepPublisher on its own: numbering, exactly one terminal chunk, and the output hold (timer included).
Chunks go to a list instead of NATS; the service tests cover the same paths over a real broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.instance.engine.llm_engine import RequestOutput
from services.instance.step_publisher import StepPublisher
from services.instance.token_stream import ChunkBuilder
from shared.messages import TokenBatch, TokenChunk, decode_token_chunks
from shared.wire import decode


def out(request_id: str, token: int, n: int, *, finished: bool = False) -> RequestOutput:
    """The step output carrying a request's n-th generated token."""
    return RequestOutput(request_id, [token], None, finished, "length" if finished else None, None, 4, n)


class Harness:
    def __init__(self) -> None:
        self.sent: list[tuple[str, TokenChunk]] = []
        self.payloads = 0  # messages published
        self.ended: list[str] = []
        self.publisher = StepPublisher(self.send, time.monotonic, self.ended.append)
        self.publisher.start()

    async def send(self, subject: str, payload: bytes) -> None:
        self.payloads += 1
        self.sent.extend((subject, chunk) for chunk in decode_token_chunks(payload))

    def open(self, *request_ids: str) -> None:
        for request_id in request_ids:
            self.publisher.open(request_id, f"router.{request_id}", ChunkBuilder(request_id, 4, lambda t: t))

    async def chunks(self, request_id: str) -> list[TokenChunk]:
        await asyncio.sleep(0)  # let the sender run
        await asyncio.wait_for(self.publisher.flushed(), 5)
        return [chunk for _, chunk in self.sent if chunk.request_id == request_id]


def tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def assert_well_formed(chunks: list[TokenChunk]) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    terminal = [c.finished or c.error is not None for c in chunks]
    assert terminal == [False] * (len(chunks) - 1) + [True]


async def test_one_step_many_requests_numbered_with_one_terminal_each():
    h = Harness()
    h.open("a", "b")
    h.publisher.on_step([out("a", 10, 1), out("b", 20, 1)], pending=True)
    h.publisher.on_step([out("a", 11, 2, finished=True), out("b", 21, 2)], pending=True)
    h.publisher.on_step([out("a", 12, 3), out("b", 22, 3)], pending=True)  # "a" is gone: dropped
    assert not h.publisher.abort("a"), "a finished request cannot be aborted again"
    assert h.publisher.abort("b")
    h.publisher.on_step([out("b", 23, 4)], pending=False)  # a step under way when the abort came
    a, b = await h.chunks("a"), await h.chunks("b")
    assert_well_formed(a)
    assert_well_formed(b)
    assert tokens(a) == [10, 11] and a[-1].finish_reason == "length"
    assert tokens(b) == [20, 21, 22] and b[-1].finish_reason == "abort" and b[-1].completion_tokens == 3
    assert {subject for subject, c in h.sent if c.request_id == "b"} == {"router.b"}
    assert h.ended == ["a", "b"] and len(h.publisher) == 0
    await h.publisher.close()


async def test_a_steps_chunks_for_one_router_go_out_as_one_message():
    payloads: list[tuple[str, bytes]] = []

    async def send(subject: str, payload: bytes) -> None:
        payloads.append((subject, payload))

    publisher = StepPublisher(send, time.monotonic)
    publisher.start()
    for request_id, router in (("a", "r1"), ("b", "r1"), ("c", "r1"), ("d", "r2")):
        publisher.open(request_id, router, ChunkBuilder(request_id, 4, lambda t: t))
    publisher.on_step([out(rid, 10 + i, 1) for i, rid in enumerate("abcd")], pending=True)
    await asyncio.wait_for(publisher.flushed(), 5)
    assert [subject for subject, _ in payloads] == ["r1", "r2"]
    batch, single = decode(payloads[0][1]), decode(payloads[1][1])
    assert isinstance(batch, TokenBatch) and [c.request_id for c in batch.chunks] == ["a", "b", "c"]
    assert isinstance(single, TokenChunk) and single.request_id == "d", "a lone chunk is sent plain"
    # Two steps queued before the sender runs: still one message per router, each request's chunks in order.
    payloads.clear()
    publisher.on_step([out("a", 20, 2), out("d", 21, 2)], pending=True)
    publisher.on_step([out("a", 30, 3, finished=True), out("d", 31, 3)], pending=True)
    await asyncio.wait_for(publisher.flushed(), 5)
    assert [subject for subject, _ in payloads] == ["r1", "r2"]
    for subject, payload in payloads:
        chunks = decode_token_chunks(payload)
        assert [c.seq for c in chunks] == [1, 2] and len({c.request_id for c in chunks}) == 1, subject
    await publisher.close()


async def test_fail_all_ends_every_open_request_with_an_error():
    h = Harness()
    h.open("a", "b")
    h.publisher.on_step([out("a", 1, 1)], pending=True)
    h.publisher.fail_all("engine crashed")
    h.publisher.fail_all("again")  # nothing open any more
    for request_id in ("a", "b"):
        chunks = await h.chunks(request_id)
        assert_well_formed(chunks)
        assert chunks[-1].error == "engine crashed" and chunks[-1].finish_reason == "error"
    await asyncio.wait_for(h.publisher.wait_empty(), 1)
    with pytest.raises(ValueError, match="already open"):
        h.open("c")
        h.open("c")


async def test_held_outputs_come_out_merged_and_in_order():
    h = Harness()
    h.open("a", "b")
    h.publisher.on_step([out("a", 1, 1)], pending=True)  # before the hold: published
    h.publisher.begin_hold(60.0, time.monotonic())
    h.publisher.on_step([out("a", 2, 2), out("b", 10, 1)], pending=True)
    h.publisher.on_step([out("a", 3, 3), out("b", 11, 2, finished=True)], pending=True)
    assert h.publisher.num_held_requests == 1
    b = await h.chunks("b")
    assert len(b) == 1 and tokens(b) == [10, 11] and b[0].finished, "a finished request is released at once"
    assert tokens(await h.chunks("a")) == [1]
    h.publisher.end_hold()
    h.publisher.on_step([out("a", 4, 4, finished=True)], pending=False)
    a = await h.chunks("a")
    assert_well_formed(a)
    assert [c.token_ids for c in a] == [[1], [2, 3], [4]]
    assert [c.completion_tokens for c in a] == [1, 3, 4]


async def test_the_deadline_releases_held_outputs_without_a_step():
    h = Harness()
    h.open("a")
    h.publisher.begin_hold(0.2, time.monotonic())
    h.publisher.on_step([out("a", 1, 1)], pending=True)
    h.publisher.on_step([out("a", 2, 2)], pending=True)
    await asyncio.sleep(0.1)
    assert await h.chunks("a") == [] and h.publisher.holding
    await asyncio.sleep(0.2)  # past the deadline, and no step came
    a = await h.chunks("a")
    assert [c.token_ids for c in a] == [[1, 2]] and a[0].seq == 0
    h.publisher.on_step([out("a", 3, 3)], pending=True)  # past the deadline: streamed again
    assert [c.token_ids for c in await h.chunks("a")] == [[1, 2], [3]]


async def test_an_aborted_request_loses_what_was_held_for_it():
    h = Harness()
    h.open("a", "b")
    h.publisher.begin_hold(60.0, time.monotonic())
    h.publisher.on_step([out("a", 1, 1), out("b", 5, 1)], pending=True)
    assert h.publisher.abort("a")
    h.publisher.end_hold()
    a, b = await h.chunks("a"), await h.chunks("b")
    assert [(c.seq, c.token_ids, c.finish_reason) for c in a] == [(0, [], "abort")]
    assert [(c.seq, c.token_ids) for c in b] == [(0, [5])]


async def test_close_hands_every_queued_chunk_to_send():
    h = Harness()
    h.open(*(str(i) for i in range(50)))
    h.publisher.on_step([out(str(i), i, 1, finished=True) for i in range(50)], pending=False)
    await h.publisher.close()
    assert len(h.sent) == 50


async def test_a_request_whose_chunk_cannot_be_sent_is_given_up():
    sent: list[TokenChunk] = []
    lost: list[str] = []

    async def send(subject: str, payload: bytes) -> None:
        if subject == "router.a":  # the router of "a" only: "b" goes elsewhere
            raise ConnectionError("connection closed")
        sent.extend(decode_token_chunks(payload))

    publisher = StepPublisher(send, time.monotonic, on_lost=lost.append)
    publisher.start()
    for request_id in ("a", "b"):
        publisher.open(request_id, f"router.{request_id}", ChunkBuilder(request_id, 4, lambda t: t))
    publisher.on_step([out("a", 1, 1), out("b", 2, 1)], pending=True)
    await asyncio.wait_for(publisher.flushed(), 5)
    assert lost == ["a"] and "a" not in publisher and "b" in publisher
    publisher.on_step([out("a", 3, 2), out("b", 4, 2, finished=True)], pending=False)
    await publisher.close()
    assert [(c.request_id, c.seq) for c in sent] == [("b", 0), ("b", 1)]


async def test_an_infinite_slo_holds_until_the_hold_ends():
    h = Harness()
    h.open("a")
    h.publisher.begin_hold(float("inf"), time.monotonic())
    h.publisher.on_step([out("a", 1, 1)], pending=True)
    await asyncio.sleep(0.05)
    assert await h.chunks("a") == []
    h.publisher.end_hold()
    assert [c.token_ids for c in await h.chunks("a")] == [[1]]
