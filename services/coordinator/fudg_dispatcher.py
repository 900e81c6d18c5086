"""Submit → dispatch under `dispatch_policy = fudg` (DistServe-style full disaggregation): the pure rule in
fudg_dispatch.py picks a prefill-role and a decode-role instance, and the DispatchRequest naming the decode
instance goes to the prefill instance, which hands the request over after its first token.

FuDG pairs instances across the whole cluster (every instance outside the spare pool): macro instances are
PaDG's unit and mean nothing here. The SubmitAck names the prefill instance (aborts go there; its role
forwards them). The request is recorded in flight under both instances, so losing either one ends its
stream (inflight.py). A prefill instance that does not take the request is left out and the rule asked
again, up to MAX_DISPATCH_ATTEMPTS times, as with least-loaded.
"""

from __future__ import annotations

import time

from services.coordinator.dispatch import Overloaded
from services.coordinator.dispatcher import MAX_DISPATCH_ATTEMPTS, RETRY_AFTER, Dispatcher, refusal
from services.coordinator.fudg_dispatch import FudgDispatch, choose_for_records
from services.coordinator.inflight import Inflight
from services.coordinator.instance_link import ask
from services.coordinator.scaling import SPARE_POOL
from shared.messages import (
    DispatchAck,
    DispatchRequest,
    ErrorReply,
    FudgRole,
    InstanceInfo,
    SubmitAck,
    SubmitRequest,
)

_NO_ROLES = " (FuDG needs instances started with --fudg-role prefill and --fudg-role decode)"


def _role(info: InstanceInfo) -> FudgRole:
    return info.role


async def dispatch_fudg(sender: Dispatcher, submit: SubmitRequest) -> SubmitAck | ErrorReply:
    """The router's answer to `submit`, using the sender's registry, in-flight table and configuration."""
    registry, scheduling = sender.registry, sender.scheduling
    excluded: set[str] = set()
    failures: list[str] = []
    for _ in range(MAX_DISPATCH_ATTEMPTS):
        records = [r for r in registry if r.macro_instance_id != SPARE_POOL and r.instance_id not in excluded]
        decision = choose_for_records(
            records,
            sender.inflight,
            _role,
            prompt_tokens=len(submit.prompt_token_ids),
            max_waiting_per_instance=scheduling.max_waiting_per_instance,
            retry_after=RETRY_AFTER,
        )
        if not isinstance(decision, FudgDispatch):
            code = "overloaded" if isinstance(decision, Overloaded) else "unavailable"
            message = "; ".join([decision.message, *failures])
            if not any(r.info.role != "mixed" for r in registry):
                message += _NO_ROLES
            return ErrorReply(code=code, message=message, retry_after=decision.retry_after)
        outcome = await send_pair(sender, submit, decision)
        if not isinstance(outcome, str):
            return outcome
        failures.append(outcome)
        excluded.add(decision.prefill_instance_id)
    return ErrorReply(code="unavailable", message="; ".join(failures), retry_after=RETRY_AFTER)


async def send_pair(
    sender: Dispatcher, submit: SubmitRequest, pair: FudgDispatch
) -> SubmitAck | ErrorReply | str:
    """Dispatch to the pair's prefill instance; the router's answer, or (a str) why it did not take it."""
    prefill, decode = pair.prefill_instance_id, pair.decode_instance_id
    rid = submit.request_id
    request = DispatchRequest.from_submit(
        submit, instance_id=prefill, dispatch_time=time.time(), decode_instance_id=decode
    )
    now = time.monotonic()
    common = {
        "request_id": rid,
        "reply_subject": submit.reply_subject,
        "prompt_tokens": len(submit.prompt_token_ids),
        "dispatched_at": now,
    }
    # Recorded before awaiting: concurrent submits see the queued prompt and the promised KV.
    sender.inflight.add(Inflight(instance_id=prefill, partner=decode, **common))
    sender.inflight.add(Inflight(instance_id=decode, partner=prefill, awaiting_kv=True, **common))
    sender.registry.note_dispatch(prefill, rid)
    record = sender.registry.get(prefill)
    reply = await ask(sender.nc, record.info.subjects.requests, request, sender.scheduling.dispatch_timeout)
    if isinstance(reply, DispatchAck) and reply.accepted:
        return SubmitAck(request_id=rid, instance_id=prefill)
    sender.inflight.discard(prefill, rid)
    sender.inflight.discard(decode, rid)
    sender.registry.cancel_dispatch(prefill, rid)
    return refusal(rid, prefill, reply)
