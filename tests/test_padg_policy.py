"""The `padg` policy at the scheduler level, pure: no model, no clock."""

from __future__ import annotations

import random

import pytest

from services.instance.engine.block_manager import BlockManager
from services.instance.engine.policies import PaDGPolicy, SarathiPolicy, make_policy
from services.instance.engine.sampling_params import SamplingParams
from services.instance.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.instance.engine.sequence import FinishReason, Sequence, SequenceStatus


def seq(rid: str, prompt_len: int, arrival: float, max_tokens: int = 8) -> Sequence:
    return Sequence(
        rid,
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        arrival_time=arrival,
        eos_token_ids=frozenset({0}),
    )


def make(policy, blocks=64, block_size=4, budget=64, max_seqs=16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, 512), BlockManager(blocks, block_size), policy)


def advance(s: Scheduler, out: SchedulerOutput, now: float) -> None:
    s.postprocess(out, {c.seq.request_id: 7 for c in out.chunks if c.samples}, now)


def ids(out: SchedulerOutput) -> list[str]:
    return [c.seq.request_id for c in out.chunks]


def open_window_with(s: Scheduler, policy: PaDGPolicy, *rids: str, now: float = 0.0) -> None:
    """Open the window, prefill prompts `rids` (4 tokens each) in one step; they decode afterwards."""
    policy.set_prefill_active(True, now)
    for rid in rids:
        s.add(seq(rid, 4, now))
    out = s.schedule(now)
    assert ids(out) == list(rids) and out.num_decode_tokens == 0
    advance(s, out, now)


def test_closed_window_only_decodes_and_leaves_new_prompts_waiting():
    policy = PaDGPolicy(admit_grace=0.0)
    s = make(policy)
    open_window_with(s, policy, "a", "b")
    policy.set_prefill_active(False, 1.0)
    late = seq("late", 6, arrival=2.0)
    s.add(late)
    for t in (2.0, 3.0, 4.0):
        out = s.schedule(t)
        assert ids(out) == ["a", "b"] and out.num_prefill_tokens == 0
        advance(s, out, t)
    assert list(s.waiting) == [late]
    assert late.status is SequenceStatus.WAITING
    assert late.num_computed_tokens == 0 and late.block_table == [] and late.first_scheduled_time is None


def test_a_never_opened_window_schedules_nothing_for_waiting_prompts():
    policy = make_policy("padg")
    assert isinstance(policy, PaDGPolicy) and not policy.activated and policy.phase == "decode"
    s = make(policy)
    s.add(seq("a", 5, arrival=0.0))
    assert s.schedule(1.0).is_empty
    assert [x.request_id for x in s.waiting] == ["a"]


def test_open_window_prefills_first_and_decodes_pause():
    policy = PaDGPolicy()
    s = make(policy, budget=10)
    open_window_with(s, policy, "a")
    s.add(seq("b", 6, arrival=1.0))
    s.add(seq("c", 6, arrival=1.0))
    out = s.schedule(1.0)
    assert ids(out) == ["b"], "whole prompts within the budget, no decode alongside"
    advance(s, out, 1.0)
    out = s.schedule(2.0)
    assert ids(out) == ["c"]
    advance(s, out, 2.0)
    out = s.schedule(3.0)
    assert sorted(ids(out)) == ["a", "b", "c"] and out.num_prefill_tokens == 0


def test_open_window_with_nothing_waiting_decodes():
    policy = PaDGPolicy()
    s = make(policy)
    open_window_with(s, policy, "a")
    policy.set_prefill_active(False, 1.0)
    assert policy.set_prefill_active(True, 2.0)
    assert policy.phase == "prefill"
    out = s.schedule(2.0)
    assert ids(out) == ["a"] and out.num_decode_tokens == 1


def test_prompts_that_arrived_during_the_window_are_prefilled_after_it_closes():
    # The dispatch landed in the queue, then the close message came before the engine's next step.
    policy = PaDGPolicy(admit_grace=0.5)
    s = make(policy)
    open_window_with(s, policy, "a")
    s.add(seq("in_window", 4, arrival=1.0))
    policy.set_prefill_active(False, 2.0)
    s.add(seq("in_grace", 4, arrival=2.4))  # sent before the close, handled after it
    s.add(seq("after", 4, arrival=2.6))
    out = s.schedule(3.0)
    assert ids(out) == ["in_window", "in_grace"], "admitted prompts first, decodes pause"
    advance(s, out, 3.0)
    out = s.schedule(4.0)
    assert sorted(ids(out)) == ["a", "in_grace", "in_window"] and out.num_prefill_tokens == 0
    assert [x.request_id for x in s.waiting] == ["after"]


def test_without_finish_admitted_prefills_a_closed_window_is_strict():
    policy = PaDGPolicy(finish_admitted_prefills=False)
    s = make(policy)
    open_window_with(s, policy, "a")
    s.add(seq("in_window", 4, arrival=1.0))
    policy.set_prefill_active(False, 2.0)
    out = s.schedule(3.0)
    assert ids(out) == ["a"]
    assert [x.request_id for x in s.waiting] == ["in_window"]


def test_a_prompt_larger_than_the_budget_finishes_its_prefill_after_the_close():
    policy = PaDGPolicy(finish_admitted_prefills=False)
    s = make(policy, budget=8)
    policy.set_prefill_active(True, 0.0)
    s.add(seq("big", 20, arrival=0.0))
    out = s.schedule(0.0)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 8)]
    advance(s, out, 0.0)
    policy.set_prefill_active(False, 1.0)
    starts = []
    while not s.find("big").output_token_ids:
        out = s.schedule(2.0)
        starts.append(out.chunks[0].start)
        advance(s, out, 2.0)
    assert starts == [8, 16], "the partly prefilled prompt holds blocks: it is finished, not parked"


def test_window_timestamps_and_repeated_messages():
    policy = PaDGPolicy()
    assert policy.switched_at is None and policy.num_switches == 0
    assert policy.set_prefill_active(True, 5.0)
    assert not policy.set_prefill_active(True, 6.0), "a retried open does not restart the window"
    assert policy.window_opened_at == 5.0 and policy.switched_at == 5.0
    assert policy.set_prefill_active(False, 7.0)
    assert not policy.set_prefill_active(False, 8.0)
    # A repeated close is not a switch, but it moves the close time (prompts sent before it are admitted).
    assert (policy.window_closed_at, policy.switched_at, policy.num_switches) == (8.0, 7.0, 2)
    with pytest.raises(ValueError, match="admit_grace"):
        PaDGPolicy(admit_grace=-1.0)


def test_preemption_under_a_closed_window_recomputes_the_victim():
    # 4 blocks of 4 tokens: three 4-token prompts fill 3 blocks, and each needs a new block to decode.
    policy = PaDGPolicy(finish_admitted_prefills=False)
    s = make(policy, blocks=4, block_size=4)
    open_window_with(s, policy, "a", "b", "c")
    policy.set_prefill_active(False, 1.0)
    out = s.schedule(1.0)
    assert ids(out) == ["a", "b"] and [x.request_id for x in out.preempted] == ["c"]
    advance(s, out, 1.0)
    c = s.find("c")
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    s.finish(s.find("a"), FinishReason.ABORT, 2.0)
    out = s.schedule(2.0)
    assert [(x.seq.request_id, x.start, x.num_tokens) for x in out.chunks] == [("c", 0, 5)], (
        "the preempted request comes back although the window is closed"
    )
    advance(s, out, 2.0)
    assert c.status is SequenceStatus.RUNNING and c.is_decoding


def test_a_policy_swapped_in_mid_run_picks_up_what_the_last_one_left():
    s = make(SarathiPolicy(), budget=6)
    s.add(seq("chunked", 15, arrival=0.0))
    advance(s, s.schedule(0.0), 0.0)  # 6 of 15 prompt tokens computed
    s.add(seq("waiting", 3, arrival=0.5))
    s.policy = PaDGPolicy(finish_admitted_prefills=False)  # closed, never opened
    out = s.schedule(1.0)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("chunked", 6, 6)]
    advance(s, out, 1.0)
    assert [x.request_id for x in s.waiting] == ["waiting"]


def test_many_switches_respect_the_window_and_finish_everything():
    rng = random.Random(7)
    policy = PaDGPolicy(admit_grace=0.0)
    s = make(policy, blocks=24, block_size=4, budget=24, max_seqs=6)
    pending = [seq(f"r{i}", rng.randint(2, 14), 0.0, max_tokens=rng.randint(1, 10)) for i in range(60)]
    arrived: list[Sequence] = []
    t = 0.0
    held_back = 0  # steps in which a closed window left a prompt waiting
    while pending or s.has_unfinished():
        t += 1.0
        if rng.random() < 0.4:
            policy.set_prefill_active(not policy.activated, t)
        if pending and rng.random() < 0.6:
            new = pending.pop(0)
            new.arrival_time = t
            s.add(new)
            arrived.append(new)
        waiting_before = {id(x) for x in s.waiting}
        idle_before = not s.running
        out = s.schedule(t)
        prefilled = [c.seq for c in out.chunks if not c.seq.is_decoding]
        if prefilled:
            assert out.num_decode_tokens == 0, "prefill first: decodes pause"
        if not policy.activated:
            closed = policy.window_closed_at
            for x in prefilled:
                if id(x) in waiting_before:
                    assert x.num_preemptions or (closed is not None and x.arrival_time <= closed), (
                        f"{x.request_id} arrived at {x.arrival_time}, after the close at {closed}"
                    )
            held_back += bool(s.waiting)
        elif waiting_before and idle_before:
            assert prefilled, "an open window with an idle instance takes the waiting prompts"
        advance(s, out, t)
        assert t < 2000, "did not finish"
    assert policy.num_switches > 20 and held_back > 10
    assert all(x.finish_reason is FinishReason.LENGTH for x in arrived)
    assert all(x.num_output_tokens == x.params.max_tokens for x in arrived)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_make_policy_passes_options():
    policy = make_policy("padg", activated=True, finish_admitted_prefills=False)
    assert isinstance(policy, PaDGPolicy) and policy.activated and not policy.finish_admitted_prefills
    with pytest.raises(TypeError):
        make_policy("nodg", activated=True)


def test_a_close_without_its_open_still_prefills_what_was_sent_for_that_window():
    # The coordinator opened this instance's window and sent it prompts, but the open was lost; the next
    # close (a newer epoch) must not strand those prompts until a window that may never come.
    policy = PaDGPolicy(admit_grace=0.0)
    s = make(policy)
    policy.set_prefill_active(False, 0.5)
    s.add(seq("sent_for_lost_window", 4, arrival=1.0))
    assert s.schedule(1.5).chunks == [], "closed window: prompts wait"
    assert not policy.set_prefill_active(False, 2.0), "still closed: not a change"
    out = s.schedule(2.5)
    assert ids(out) == ["sent_for_lost_window"]
    assert policy.window_closed_at == 2.0
