"""Submit → dispatch with the least-loaded policy: ask it for an instance, hand it the request, and tell the
router where it went (SubmitAck) or why it could not go anywhere (ErrorReply). `send` (one instance, with
the registry and in-flight bookkeeping) is shared with the PaDG dispatch (padg_dispatcher.py).

An instance that does not take the request (no answer in time, not listening, draining, full) is left out
and the policy asked again, up to MAX_DISPATCH_ATTEMPTS instances; an instance's verdict on the request
itself (bad_request, …) goes straight back to the router.
"""

from __future__ import annotations

import logging
import time

from nats.aio.client import Client as NATS

from services.coordinator.dispatch import POLICIES, Dispatch, DispatchPolicy, Overloaded, make_policy
from services.coordinator.inflight import Inflight, InflightTracker
from services.coordinator.instance_link import Answer, ask
from services.coordinator.registry import Registry
from services.coordinator.scheduling_config import SchedulingConfig
from shared.messages import DispatchAck, DispatchRequest, ErrorReply, SubmitAck, SubmitRequest

log = logging.getLogger(__name__)

MAX_DISPATCH_ATTEMPTS = 3
RETRY_AFTER = 1.0  # seconds, when every instance tried turned the request away
_TRY_ANOTHER = frozenset({"unavailable", "overloaded"})  # instance-side reasons, not the request's fault


class Dispatcher:
    def __init__(self, nc: NATS, registry: Registry, inflight: InflightTracker, scheduling: SchedulingConfig):
        self.nc = nc
        self.registry = registry
        self.inflight = inflight
        self.scheduling = scheduling
        self.policy: DispatchPolicy = _balancing_policy(scheduling)

    def configure(self, scheduling: SchedulingConfig) -> None:
        self.policy = _balancing_policy(scheduling)
        self.scheduling = scheduling

    async def dispatch(self, submit: SubmitRequest, macro_instance_id: str) -> SubmitAck | ErrorReply:
        excluded: set[str] = set()
        failures: list[str] = []
        for _ in range(MAX_DISPATCH_ATTEMPTS):
            candidates = [
                c for c in self.registry.candidates(macro_instance_id) if c.instance_id not in excluded
            ]
            decision = self.policy.choose(
                candidates, max_waiting_per_instance=self.scheduling.max_waiting_per_instance
            )
            if not isinstance(decision, Dispatch):
                code = "overloaded" if isinstance(decision, Overloaded) else "unavailable"
                message = "; ".join([decision.message, *failures])
                return ErrorReply(code=code, message=message, retry_after=decision.retry_after)
            outcome = await self.send(submit, decision.instance_id)
            if not isinstance(outcome, str):
                return outcome
            failures.append(outcome)
            excluded.add(decision.instance_id)
        return ErrorReply(code="unavailable", message="; ".join(failures), retry_after=RETRY_AFTER)

    async def send(self, submit: SubmitRequest, instance_id: str) -> SubmitAck | ErrorReply | str:
        """The router's answer, or (a str) why this instance did not take the request."""
        record = self.registry.get(instance_id)
        request = DispatchRequest.from_submit(submit, instance_id=instance_id, dispatch_time=time.time())
        # Counted before awaiting, so concurrent submits already see this one.
        self.registry.note_dispatch(instance_id, submit.request_id)
        reply = await ask(self.nc, record.info.subjects.requests, request, self.scheduling.dispatch_timeout)
        if isinstance(reply, DispatchAck) and reply.accepted:
            self.inflight.add(
                Inflight(
                    request_id=submit.request_id,
                    instance_id=instance_id,
                    reply_subject=submit.reply_subject,
                    prompt_tokens=len(submit.prompt_token_ids),
                    dispatched_at=time.monotonic(),
                )
            )
            return SubmitAck(request_id=submit.request_id, instance_id=instance_id)
        self.registry.cancel_dispatch(instance_id, submit.request_id)
        return refusal(submit.request_id, instance_id, reply)


def refusal(request_id: str, instance_id: str, reply: Answer | str) -> ErrorReply | str:
    """An instance did not take a request: the ErrorReply for the router when it is the request's fault,
    else (a str) why this instance did not, so another may be tried."""
    if isinstance(reply, ErrorReply):
        if reply.code not in _TRY_ANOTHER:
            return reply
        problem = f"instance {instance_id}: {reply.code}: {reply.message}"
    elif isinstance(reply, DispatchAck):
        problem = f"instance {instance_id} refused: {reply.reason or 'no reason given'}"
    elif isinstance(reply, str):
        problem = f"instance {instance_id}: {reply}"
    else:
        problem = f"instance {instance_id} answered a {type(reply).__name__}"
    log.info("request %s not dispatched: %s", request_id, problem)
    return problem


def _balancing_policy(scheduling: SchedulingConfig) -> DispatchPolicy:
    """The policy by name; `padg` and `fudg` are not among these (their dispatch lives in padg_dispatcher.py
    and fudg_dispatcher.py), so they get least-loaded here, which is what requests are balanced by right
    after switching away from them."""
    name = scheduling.dispatch_policy
    return make_policy(name if name in POLICIES else "least_loaded")
