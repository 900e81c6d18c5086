"""The admission checks of PaDG request dispatch: may this instance take one more prompt in its prefill
window? Two variants (research/ecoserve.md §4), both pure functions of the instance views:

- `paper_check`: Algorithm 1 (CheckConstraints) of the paper — TTFT budget of the window, mean decode slack
  of the running requests, KV blocks.
- `authors_check`: what the official code runs — max instead of mean slack measured at the window's opening,
  then a look-ahead at the next instance in the cycle.

Each returns a `Verdict` naming the rule that decided, for logs and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.coordinator.padg_views import Admitted, HeldRequest, InstanceView, Window


@dataclass(frozen=True, slots=True)
class Verdict:
    instance_id: str
    ok: bool
    # paper: "fits" | "oversized" (a prompt over the budget alone, in an empty window) | "ttft_budget" |
    # "decode_slack" | "kv"
    # authors: "slack_covers" | "next_short_of_slack" | "kv" | "ttft_budget" | "next_idle" | "next_has_slack"
    rule: str
    detail: str


def paper_check(
    view: InstanceView, window: Window, r: Admitted, *, ttft_slo: float, tpot_slo: float, now: float
) -> Verdict:
    """Algorithm 1 on `view`, whose prefill window is `window` (a fresh one opening at `now` when the
    instance is not the activated one).

    A request on the instance that is still waiting for its prefill but was admitted in an earlier window
    (the prediction was short, or the instance was slow) counts as prefill work of this window: the paper's
    arrival-time split would count it as a decode, but it has no first token to measure slack from, and
    the instance will prefill it now."""
    held = view.held()
    in_window = window.request_ids
    carried = [h for h in held if h.first_token_time is None and h.request_id not in in_window]
    total = window.prefill_time + sum(h.prefill_time for h in carried) + r.prefill_time
    # A prompt whose prefill alone exceeds the budget would wait for ever (and hold up every request queued
    # behind it): it may have a window to itself instead, missing its TTFT SLO but not starving.
    alone = not window.admitted and not carried
    if total > ttft_slo and not alone:
        return _no(view, "ttft_budget", f"window prefill {total:.3f}s would exceed the TTFT SLO {ttft_slo}s")
    slack = view.mean_saved_tpot(tpot_slo, now, exclude=in_window)
    if slack is not None and slack < total:
        return _no(view, "decode_slack", f"mean saved TPOT {slack:.3f}s < window prefill {total:.3f}s")
    # Blocks of requests not yet prefilled are not in the reported free count yet.
    reserved = sum(h.kv_blocks for h in held if h.first_token_time is None)
    if reserved + r.kv_blocks > view.kv_blocks_free:
        return _no(view, "kv", _kv_detail(reserved + r.kv_blocks, view.kv_blocks_free))
    slack_text = "no decodes" if slack is None else f"mean saved TPOT {slack:.3f}s"
    rule = "fits" if total <= ttft_slo else "oversized"
    return Verdict(view.instance_id, True, rule, f"window prefill {total:.3f}s, {slack_text}")


def authors_check(
    current: InstanceView,
    window: Window,
    following: InstanceView,
    *,
    members: int,
    r: Admitted,
    ttft_slo: float,
    tpot_slo: float,
    now: float,
) -> Verdict:
    """The official code's check of the activated instance `current` (window `window`); `following` is the
    next instance of the cycle and `members` the cycle's length (at least 2)."""
    need_blocks = window.kv_blocks + r.kv_blocks
    need_time = window.prefill_time + r.prefill_time
    in_window = window.request_ids
    others = [h for h in current.held() if h.request_id not in in_window]
    # Each request of the window brings a budget of one TTFT SLO; the running ones bring their best slack,
    # measured when the window opened (so prefills already done in it are not subtracted twice).
    entries = [ttft_slo] * len(window.admitted)
    if others:
        entries.append(max(_slack(h, ttft_slo, tpot_slo, window.opened_at) for h in others))
    if need_blocks > current.kv_blocks_free:
        return _no(current, "kv", _kv_detail(need_blocks, current.kv_blocks_free))
    if not entries or min(entries) > need_time:
        budget = f"{min(entries):.3f}s" if entries else "unbounded"
        return Verdict(current.instance_id, True, "slack_covers", f"need {need_time:.3f}s < budget {budget}")
    if need_time > ttft_slo:
        return _no(current, "ttft_budget", f"window prefill {need_time:.3f}s > TTFT SLO {ttft_slo}s")
    # Stay while the next instance has not saved enough slack to take over the prefills.
    queued = following.held()
    if not queued:
        return _no(current, "next_idle", f"{following.instance_id} holds no requests")
    next_slack = max(_slack(h, ttft_slo, tpot_slo, now) for h in queued)
    bound = ttft_slo * (members - 1) / members
    detail = f"{following.instance_id} max saved TPOT {next_slack:.3f}s vs {bound:.3f}s"
    if next_slack < bound:
        return Verdict(current.instance_id, True, "next_short_of_slack", detail)
    return _no(current, "next_has_slack", detail)


def _slack(h: HeldRequest, ttft_slo: float, tpot_slo: float, at: float) -> float:
    """The code's saved TPOT: ttft + iterations·S_TPOT − (at − arrival); a request without a first token
    counts its TTFT as the SLO."""
    ttft = ttft_slo if h.first_token_time is None else h.first_token_time - h.arrival_time
    return ttft + h.output_tokens * tpot_slo - (at - h.arrival_time)


def _kv_detail(need: int, free: int) -> str:
    return f"needs {need} KV blocks, {free} free"


def _no(view: InstanceView, rule: str, detail: str) -> Verdict:
    return Verdict(view.instance_id, False, rule, detail)
