"""Output-token holding with injected time."""

from __future__ import annotations

import pytest

from services.instance.engine.llm_engine import RequestOutput
from services.instance.engine.output_hold import OutputHold, merge_outputs
from services.instance.engine.sequence import TokenLogprobs


def out(rid: str, token: int, n: int, finished: bool = False, logprob: bool = False) -> RequestOutput:
    """The `n`-th output token of request `rid`."""
    return RequestOutput(
        request_id=rid,
        new_token_ids=[token],
        new_logprobs=[TokenLogprobs(token, -0.5, 1, [])] if logprob else None,
        finished=finished,
        finish_reason="length" if finished else None,
        stop_reason=None,
        num_prompt_tokens=5,
        num_output_tokens=n,
        arrival_time=1.0,
        first_scheduled_time=2.0,
        first_token_time=3.0,
    )


def tokens(released: list[RequestOutput]) -> dict[str, list[int]]:
    return {o.request_id: o.new_token_ids for o in released}


def test_outputs_pass_through_when_not_holding():
    hold = OutputHold(ttft_slo=1.0)
    a = out("a", 10, 1)
    assert hold.push([a], 0.0, pending=True) == [a]
    assert not hold.holding and hold.deadline is None


def test_holds_during_the_window_and_releases_when_control_returns():
    hold = OutputHold(ttft_slo=5.0)
    hold.begin(10.0)
    assert hold.push([out("a", 1, 1)], 10.5, pending=True) == []
    assert hold.push([out("a", 2, 2), out("b", 7, 1)], 11.0, pending=True) == []
    assert hold.num_held_requests == 2 and hold.deadline == 15.0
    released = hold.end()
    assert tokens(released) == {"a": [1, 2], "b": [7]}
    assert [o.num_output_tokens for o in released] == [2, 1]
    assert not hold.holding and hold.num_held_requests == 0
    assert hold.push([out("a", 3, 3)], 11.5, pending=True)[0].new_token_ids == [3]


def test_releases_once_the_ttft_slo_has_passed_since_the_window_began():
    hold = OutputHold(ttft_slo=2.0)
    hold.begin(0.0)
    assert hold.push([out("a", 1, 1)], 1.0, pending=True) == []
    assert hold.push([out("a", 2, 2)], 2.0, pending=True) == [], "exactly the SLO is not more than it"
    assert tokens(hold.push([out("a", 3, 3)], 2.5, pending=True)) == {"a": [1, 2, 3]}
    assert hold.holding, "the window is still open, but what comes now is already due"
    assert tokens(hold.push([out("a", 4, 4)], 2.6, pending=True)) == {"a": [4]}


def test_a_timer_releases_at_the_deadline_without_a_new_step():
    hold = OutputHold(ttft_slo=2.0)
    hold.begin(0.0)
    hold.push([out("a", 1, 1)], 0.5, pending=True)
    assert hold.push([], 1.9, pending=True) == []
    assert tokens(hold.push([], 2.1, pending=True)) == {"a": [1]}
    assert hold.deadline is None


def test_releases_when_nothing_else_is_pending():
    hold = OutputHold(ttft_slo=10.0)
    hold.begin(0.0)
    hold.push([out("a", 1, 1)], 0.1, pending=True)
    assert tokens(hold.push([out("b", 5, 1)], 0.2, pending=False)) == {"a": [1], "b": [5]}


def test_a_finished_request_is_released_at_once_with_what_was_held():
    hold = OutputHold(ttft_slo=10.0)
    hold.begin(0.0)
    hold.push([out("a", 1, 1), out("b", 4, 1)], 0.1, pending=True)
    released = hold.push([out("a", 2, 2, finished=True), out("b", 5, 2)], 0.2, pending=True)
    assert tokens(released) == {"a": [1, 2]}
    assert released[0].finished and released[0].finish_reason == "length"
    assert hold.num_held_requests == 1


def test_discard_forgets_an_aborted_request():
    hold = OutputHold(ttft_slo=10.0)
    hold.begin(0.0)
    hold.push([out("a", 1, 1), out("b", 2, 1)], 0.1, pending=True)
    hold.discard("a")
    hold.discard("never-seen")
    assert tokens(hold.end()) == {"b": [2]}


def test_begin_twice_keeps_the_first_start_and_disabled_never_holds():
    hold = OutputHold(ttft_slo=1.0)
    hold.begin(0.0)
    hold.begin(0.9)
    hold.push([out("a", 1, 1)], 0.5, pending=True)
    assert hold.deadline == 1.0
    off = OutputHold(ttft_slo=1.0, enabled=False)
    off.begin(0.0)
    a = out("a", 1, 1)
    assert not off.holding and off.push([a], 0.1, pending=True) == [a]
    with pytest.raises(ValueError):
        OutputHold(ttft_slo=-1.0)


def test_merge_keeps_order_logprobs_and_the_latest_state():
    merged = merge_outputs(
        [out("a", 1, 1, logprob=True), out("a", 2, 2, logprob=True), out("a", 3, 3, True, logprob=True)]
    )
    assert merged.new_token_ids == [1, 2, 3]
    assert [lp.token_id for lp in merged.new_logprobs] == [1, 2, 3]
    assert merged.finished and merged.num_output_tokens == 3 and merged.first_token_time == 3.0
    assert merge_outputs([out("a", 1, 1)]).new_logprobs is None
    with pytest.raises(ValueError):
        merge_outputs([out("a", 1, 1), out("b", 1, 1)])
    with pytest.raises(ValueError):
        merge_outputs([])
