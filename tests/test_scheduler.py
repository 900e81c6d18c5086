"""Block manager and scheduling policies, pure: no model, no clock."""

from __future__ import annotations

import pytest

from services.instance.engine.block_manager import BlockManager
from services.instance.engine.policies import NoDGPolicy, SarathiPolicy, make_policy
from services.instance.engine.sampling_params import SamplingParams
from services.instance.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.instance.engine.sequence import FinishReason, Sequence, SequenceStatus

EOS = 0


def seq(rid: str, prompt_len: int, max_tokens: int = 8, **params) -> Sequence:
    return Sequence(
        rid,
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
        eos_token_ids=frozenset({EOS}),
    )


def make(policy, blocks=64, block_size=4, budget=64, max_seqs=16, max_len=512) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), BlockManager(blocks, block_size), policy)


def advance(s: Scheduler, out: SchedulerOutput, token: int = 7, now: float = 0.0) -> list[Sequence]:
    """Pretend the model ran: every sampling chunk gets `token`."""
    return s.postprocess(out, {c.seq.request_id: token for c in out.chunks if c.samples}, now)


def test_block_manager_allocates_and_frees_everything():
    bm = BlockManager(8, 4)
    a = seq("a", 6)
    assert bm.blocks_needed(a, 6) == 2
    bm.allocate(a, 6)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 6
    a.num_computed_tokens = 6
    assert bm.blocks_needed(a, 2) == 0 and bm.blocks_needed(a, 3) == 1
    assert bm.slot(a, 5) == a.block_table[1] * 4 + 1
    with pytest.raises(RuntimeError):
        bm.allocate(a, 100)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 8
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_nodg_prefills_first_then_decodes():
    s = make(NoDGPolicy())
    s.add(seq("a", 10))
    s.add(seq("b", 5))
    out = s.schedule(0.0)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 10), ("b", 0, 5)]
    advance(s, out)
    s.add(seq("c", 3))
    out = s.schedule(1.0)
    assert [c.seq.request_id for c in out.chunks] == ["c"], "a new prompt goes before decodes"
    advance(s, out)
    out = s.schedule(2.0)
    assert sorted(c.seq.request_id for c in out.chunks) == ["a", "b", "c"]
    assert all(c.num_tokens == 1 for c in out.chunks)


def test_nodg_takes_whole_prompts_within_the_budget_and_splits_only_an_oversized_one():
    s = make(NoDGPolicy(), budget=12)
    s.add(seq("a", 8))
    s.add(seq("b", 8))
    out = s.schedule(0.0)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 8)]
    s2 = make(NoDGPolicy(), budget=12)
    s2.add(seq("big", 30))
    out = s2.schedule(0.0)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("big", 12)]
    advance(s2, out)
    out = s2.schedule(1.0)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(12, 12)]


def test_sarathi_decodes_first_and_fills_the_budget_with_chunks():
    s = make(SarathiPolicy(), budget=8)
    s.add(seq("a", 3))
    out = s.schedule(0.0)
    advance(s, out)  # a is decoding now
    s.add(seq("b", 20))
    out = s.schedule(1.0)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 3, 1), ("b", 0, 7)]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 7
    advance(s, out)
    out = s.schedule(2.0)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 4, 1), ("b", 7, 7)]
    assert not out.chunks[1].samples
    advance(s, out)
    out = s.schedule(3.0)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 5, 1), ("b", 14, 6)]
    assert out.chunks[1].samples


def test_stop_conditions_and_blocks_return():
    s = make(SarathiPolicy())
    a, b, c = seq("a", 4, max_tokens=2), seq("b", 4, stop_token_ids=[9]), seq("c", 4, min_tokens=2)
    for x in (a, b, c):
        s.add(x)
    advance(s, s.schedule(0.0), token=5)
    out = s.schedule(1.0)
    s.postprocess(out, {"a": 5, "b": 9, "c": EOS}, 1.0)
    assert a.finish_reason is FinishReason.LENGTH
    assert b.finish_reason is FinishReason.STOP and b.stop_reason == 9
    assert not c.is_finished, "EOS before min_tokens does not stop"
    out = s.schedule(2.0)
    s.postprocess(out, {"c": EOS}, 2.0)
    assert c.finish_reason is FinishReason.STOP and c.stop_reason is None
    assert s.blocks.num_free_blocks == s.blocks.num_blocks and not s.has_unfinished()


def test_ignore_eos_and_max_model_len():
    s = make(SarathiPolicy(), max_len=6)
    a = seq("a", 4, max_tokens=100, ignore_eos=True)
    s.add(a)
    advance(s, s.schedule(0.0), token=EOS)
    assert not a.is_finished
    advance(s, s.schedule(1.0), token=EOS)
    assert a.finish_reason is FinishReason.LENGTH and a.num_tokens == 6


def test_decode_preempts_the_newest_sequence_when_blocks_run_out():
    # 4 blocks of 4 tokens; three sequences of 4 prompt tokens fill 3 blocks, and each needs a new block
    # for its first decode token.
    s = make(SarathiPolicy(), blocks=4, block_size=4)
    for rid in "abc":
        s.add(seq(rid, 4))
    advance(s, s.schedule(0.0))
    assert s.blocks.num_free_blocks == 1
    out = s.schedule(1.0)
    # a takes the free block; b needs one too, so c (the newest) yields its block to b
    assert [c.seq.request_id for c in out.chunks] == ["a", "b"]
    assert [x.request_id for x in out.preempted] == ["c"]
    assert s.num_preemptions == 1
    c = s.find("c")
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    advance(s, out)
    out = s.schedule(2.0)  # both a and b fit their next token in their new blocks; c cannot come back yet
    assert [x.seq.request_id for x in out.chunks] == ["a", "b"] and not out.preempted
    assert [x.request_id for x in s.waiting] == ["c"]
    advance(s, out)


def test_a_preempted_sequence_recomputes_prompt_and_output():
    s = make(SarathiPolicy(), blocks=3, block_size=4, budget=64)
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.add(b)
    advance(s, s.schedule(0.0), token=11)
    out = s.schedule(1.0)  # a decodes into a new block (2 used + 1), b must yield
    assert out.preempted == [b]
    advance(s, out, token=12)
    # b comes back when a finishes; its chunk covers its prompt and the token it had generated
    s.finish(a, FinishReason.ABORT, 2.0)
    out = s.schedule(3.0)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("b", 0, 5)]
    assert out.chunks[0].samples
    assert b.token_slice(0, 5) == [1, 2, 3, 4, 11]


def test_admission_waits_for_free_blocks_rather_than_preempting():
    s = make(NoDGPolicy(), blocks=4, block_size=4)
    s.add(seq("a", 12))
    advance(s, s.schedule(0.0))
    s.add(seq("b", 8))
    out = s.schedule(1.0)
    assert [c.seq.request_id for c in out.chunks] == ["a"], "b does not fit: a decodes instead"
    assert not out.preempted


def test_max_num_seqs_limits_admission():
    s = make(SarathiPolicy(), max_seqs=2)
    for rid in "abc":
        s.add(seq(rid, 2))
    out = s.schedule(0.0)
    assert [c.seq.request_id for c in out.chunks] == ["a", "b"]


def test_abort_frees_blocks_in_any_state():
    s = make(SarathiPolicy(), budget=4)
    s.add(seq("a", 10))
    s.add(seq("b", 3))
    advance(s, s.schedule(0.0))  # a partially prefilled, b waiting
    assert s.abort("a", 1.0).finish_reason is FinishReason.ABORT
    assert s.abort("b", 1.0) is not None
    assert s.abort("zzz", 1.0) is None
    assert s.blocks.num_free_blocks == s.blocks.num_blocks and not s.has_unfinished()


def test_make_policy_rejects_unknown_names():
    assert make_policy("sarathi").name == "sarathi"
    with pytest.raises(ValueError, match="unknown scheduling policy 'padgx'"):
        make_policy("padgx")
