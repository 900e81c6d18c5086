"""Output-token holding (EcoServe's `send_output` flag): while an instance holds its prefill window, the
tokens it generates are buffered instead of streamed, and released together later.

A request prefilled early in a window gets its first token and then pauses while the rest of the window's
prompts prefill; holding that token moves the pause into TTFT instead of showing the client a long gap
between its first and second tokens. The hold never lasts long: everything is released

- when control returns to normal (`end`, the window closed),
- when more than the TTFT SLO has passed since the window began (the tokens are due anyway), or
- when nothing else is pending on the instance (nothing left for the pause to wait for).

A finished request is released at once, with whatever was held for it: its stream is over, so holding it
would only add to its latency.

Pure: no clock, `now` is an argument. The instance service feeds it each step's outputs (from the engine's
step listener) and publishes what comes back; `push([], now, pending=...)` on a timer releases held tokens
when `deadline` passes without a new step.
"""

from __future__ import annotations

from services.instance.engine.llm_engine import RequestOutput


class OutputHold:
    def __init__(self, ttft_slo: float, *, enabled: bool = True):
        if ttft_slo < 0:
            raise ValueError(f"ttft_slo must not be negative, got {ttft_slo}")
        self.ttft_slo = ttft_slo
        self.enabled = enabled
        self._window_began: float | None = None  # set while holding
        self._held: dict[str, list[RequestOutput]] = {}  # in the order requests were first held

    @property
    def holding(self) -> bool:
        return self._window_began is not None

    @property
    def deadline(self) -> float | None:
        """When the held tokens are due whatever happens (None when nothing is held)."""
        if self._window_began is None or not self._held:
            return None
        return self._window_began + self.ttft_slo

    @property
    def num_held_requests(self) -> int:
        return len(self._held)

    def begin(self, now: float) -> None:
        """The prefill window opened at `now`: hold from here on. A repeated `begin` keeps the first start,
        so a retried control message does not extend the hold."""
        if self.enabled and self._window_began is None:
            self._window_began = now

    def end(self) -> list[RequestOutput]:
        """Control returned to normal: stop holding; returns everything held, one output per request."""
        self._window_began = None
        return self._release({})

    def discard(self, request_id: str) -> None:
        """Forget what is held for an aborted request."""
        self._held.pop(request_id, None)

    def push(self, outputs: list[RequestOutput], now: float, *, pending: bool) -> list[RequestOutput]:
        """Take one step's outputs; returns what to publish now, one merged output per request (held
        tokens first). `pending`: the engine still holds unfinished requests after this step."""
        if not self._holds_at(now, pending):
            return self._release(_group(outputs))
        released: list[RequestOutput] = []
        for out in outputs:
            if out.finished:
                released.append(merge_outputs([*self._held.pop(out.request_id, []), out]))
            else:
                self._held.setdefault(out.request_id, []).append(out)
        return released

    def _holds_at(self, now: float, pending: bool) -> bool:
        began = self._window_began
        return began is not None and now - began <= self.ttft_slo and pending

    def _release(self, new: dict[str, list[RequestOutput]]) -> list[RequestOutput]:
        held, self._held = self._held, {}
        for request_id, outs in new.items():
            held.setdefault(request_id, []).extend(outs)
        return [merge_outputs(outs) for outs in held.values()]


def _group(outputs: list[RequestOutput]) -> dict[str, list[RequestOutput]]:
    grouped: dict[str, list[RequestOutput]] = {}
    for out in outputs:
        grouped.setdefault(out.request_id, []).append(out)
    return grouped


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens (and logprobs) concatenated, the latest state."""
    if not outputs:
        raise ValueError("nothing to merge")
    first, last = outputs[0], outputs[-1]
    if len(outputs) == 1:
        return first
    if any(o.request_id != first.request_id for o in outputs):
        raise ValueError("outputs of different requests cannot be merged")
    logprobs = None
    if first.new_logprobs is not None:
        logprobs = [lp for o in outputs for lp in o.new_logprobs or []]
    return RequestOutput(
        request_id=first.request_id,
        new_token_ids=[t for o in outputs for t in o.new_token_ids],
        new_logprobs=logprobs,
        finished=last.finished,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens,
        arrival_time=first.arrival_time,
        first_scheduled_time=first.first_scheduled_time,
        first_token_time=first.first_token_time,
    )
