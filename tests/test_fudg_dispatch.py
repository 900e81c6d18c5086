"""The FuDG dispatch rule: least outstanding prefill work for the prefill instance, least KV load (with room
for the request's KV) for the decode instance; 503 when a role has no ready instance, 429 when full."""

from __future__ import annotations

import dataclasses
import time

from coordinator_support import make_info, make_status

from services.coordinator.dispatch import Overloaded, Unavailable
from services.coordinator.fudg_dispatch import (
    DecodeCandidate,
    FudgDispatch,
    PrefillCandidate,
    choose_for_records,
    choose_fudg,
    decode_candidate,
    prefill_candidate,
)
from services.coordinator.inflight import Inflight, InflightTracker
from services.coordinator.registry import Registry
from shared.messages import InstanceStatus, RequestProgress


def p(instance_id: str, tokens: int, requests: int = 1, ready: bool = True) -> PrefillCandidate:
    return PrefillCandidate(instance_id, ready, tokens, requests)


def d(
    instance_id: str, free: int, *, running: int = 0, promised: int = 0, ready: bool = True
) -> DecodeCandidate:
    return DecodeCandidate(instance_id, ready, free, 100, 16, running, promised)


def choose(prefills, decodes, prompt_tokens: int = 100, max_waiting: int = 8):
    return choose_fudg(prefills, decodes, prompt_tokens=prompt_tokens, max_waiting_per_instance=max_waiting)


def test_least_prefill_work_and_least_kv_load():
    # p1 has more requests but fewer tokens to prefill: tokens decide.
    got = choose([p("p0", 900, 1), p("p1", 300, 3)], [d("d0", 20), d("d1", 70), d("d2", 50)])
    assert got == FudgDispatch("p1", "d1")


def test_promised_blocks_count_as_used():
    # d1 looks emptier but 40 of its blocks are promised to transfers it has not reported yet.
    assert choose([p("p0", 0)], [d("d0", 50), d("d1", 70, promised=40)]) == FudgDispatch("p0", "d0")


def test_ties_are_deterministic():
    got = choose(
        [p("pb", 10), p("pa", 10)], [d("db", 50, running=2), d("da", 50, running=2), d("dc", 50, running=3)]
    )
    assert got == FudgDispatch("pa", "da")


def test_not_ready_instances_are_skipped_and_missing_roles_are_unavailable():
    assert choose(
        [p("p0", 0, ready=False), p("p1", 99)], [d("d0", 90, ready=False), d("d1", 10)]
    ) == FudgDispatch("p1", "d1")
    no_prefill = choose([p("p0", 0, ready=False)], [d("d0", 90)])
    assert isinstance(no_prefill, Unavailable) and "prefill" in no_prefill.message
    no_decode = choose([p("p0", 0)], [])
    assert isinstance(no_decode, Unavailable) and "decode" in no_decode.message


def test_full_queues_or_no_room_for_the_kv_overload():
    assert isinstance(choose([p("p0", 0, requests=8)], [d("d0", 90)], max_waiting=8), Overloaded)
    # 100 prompt tokens + the first token need 7 blocks of 16; 6 free is not enough anywhere.
    assert isinstance(choose([p("p0", 0)], [d("d0", 6), d("d1", 10, promised=5)]), Overloaded)
    assert choose([p("p0", 0)], [d("d0", 6), d("d1", 7)]) == FudgDispatch("p0", "d1")


def status(free: int, running: int, prompts: list[tuple[int, bool]]) -> InstanceStatus:
    now = time.time()
    return InstanceStatus(
        instance_id="x",
        seq=0,
        time=now,
        state="ready",
        phase="idle",
        num_running=running,
        num_waiting=0,
        kv_blocks_free=free,
        kv_blocks_total=100,
        num_preemptions=0,
        requests=[
            RequestProgress(
                request_id=f"r{i}",
                prompt_tokens=n,
                output_tokens=int(done),
                arrival_time=now,
                first_token_time=now if done else None,
            )
            for i, (n, done) in enumerate(prompts)
        ],
    )


def test_candidates_from_status_reports():
    # Only requests without a first token are prefill work; unreported dispatches add theirs.
    c = prefill_candidate("p0", True, status(50, 2, [(40, False), (70, True), (5, False)]), [100])
    assert c == PrefillCandidate("p0", True, 145, 3)
    assert prefill_candidate("p1", True, None, []) == PrefillCandidate("p1", True, 0, 0)
    dc = decode_candidate(
        "d0", True, status(50, 2, []), kv_blocks_total=100, block_size=16, promised_tokens=[15, 16]
    )
    assert (dc.kv_blocks_free, dc.promised_blocks, dc.num_running) == (50, 1 + 2, 2)
    assert decode_candidate("d1", True, None, kv_blocks_total=100, block_size=16).kv_blocks_free == 100


def test_choose_for_records_counts_unlisted_dispatches():
    registry = Registry(lease_seconds=3.0)
    for name in ("p0", "p1", "d0", "d1", "m0"):
        registry.register(make_info(name, kv_blocks_total=100), "m0", now=0.0)
    registry.heartbeat(make_status("d0", kv_free=80), now=0.1)
    registry.heartbeat(make_status("d1", kv_free=70), now=0.1)
    inflight = InflightTracker()

    def role(info) -> str:
        return {"p": "prefill", "d": "decode"}.get(info.instance_id[0], "mixed")

    def choose() -> object:
        return choose_for_records(registry, inflight, role, prompt_tokens=100, max_waiting_per_instance=8)

    assert choose() == FudgDispatch("p0", "d0")
    # p0 was just given a 300-token prompt and d0 its KV (19 blocks of 16): neither shows in a report yet.
    inflight.add(Inflight("r1", "p0", "subj", 300, 0.0))
    inflight.add(Inflight("r1", "d0", "subj", 300, 0.0))
    assert choose() == FudgDispatch("p1", "d1")
    # Once p0's report lists the request as prefilled, it is no longer queued work.
    listed = make_status("p0", request_ids=("r1",))
    done = dataclasses.replace(
        listed, requests=[dataclasses.replace(listed.requests[0], first_token_time=1.0)]
    )
    inflight.observe(done, 0.2)
    registry.heartbeat(done, now=0.2)
    assert choose() == FudgDispatch("p0", "d1")


def test_a_lost_prefill_instance_takes_its_handed_off_requests_with_it():
    inflight = InflightTracker()
    # r1 still prefilling on p0; r2 already handed to d0 (p0's entry gone); r3 is someone else's.
    inflight.add(Inflight("r1", "p0", "subj", 10, 0.0, partner="d0"))
    inflight.add(Inflight("r1", "d0", "subj", 10, 0.0, partner="p0", awaiting_kv=True))
    inflight.add(Inflight("r2", "d0", "subj", 10, 0.0, partner="p0"))
    inflight.add(Inflight("r3", "d0", "subj", 10, 0.0, partner="p1"))
    assert [e.request_id for e in inflight.take_instance("p0")] == ["r1"]
    assert [(e.request_id, e.instance_id) for e in inflight.take_partnered("p0")] == [("r2", "d0")]
    assert [e.request_id for e in inflight.of("d0")] == ["r3"]
    assert inflight.take_partnered("p0") == []
