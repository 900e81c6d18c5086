"""The router's two outgoing messages: SubmitRequest to the coordinators, AbortRequest to an instance.

A coordinator's ErrorReply becomes the HTTP error a client can act on: bad_request → 400 naming the field,
not_found → 404, overloaded → 429 and unavailable → 503 (both with Retry-After); no coordinator listening or
no answer in time → 503.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client as NATS

from services.router.errors import APIError
from shared import subjects
from shared.messages import AbortRequest, RemoteError, SubmitAck, SubmitRequest, decode_reply
from shared.wire import WireError, encode

log = logging.getLogger(__name__)

SUBMIT_TIMEOUT = 10.0  # seconds; a coordinator answers in milliseconds unless it is gone
DEFAULT_RETRY_AFTER = 1.0


def error_for_reply(error: RemoteError) -> APIError:
    reply = error.reply
    if reply.code == "bad_request":
        return APIError(400, reply.message, param=reply.field, code="invalid_value")
    if reply.code == "not_found":
        return APIError(404, reply.message, code="model_not_found")
    if reply.code == "overloaded":
        retry_after = reply.retry_after or DEFAULT_RETRY_AFTER
        return APIError(
            429, f"Server overloaded: {reply.message}", code="overloaded", retry_after=retry_after
        )
    if reply.code == "unavailable":
        retry_after = reply.retry_after or DEFAULT_RETRY_AFTER
        return APIError(
            503, f"No instance available: {reply.message}", code="unavailable", retry_after=retry_after
        )
    # internal, or bad_message (the coordinator could not read what we sent: a version mismatch, our bug)
    return APIError(500, f"coordinator error ({reply.code}): {reply.message}", code=reply.code)


async def submit(nc: NATS, prefix: str, request: SubmitRequest, timeout: float = SUBMIT_TIMEOUT) -> SubmitAck:
    """Send the request to any coordinator and return its ack, or raise the APIError to answer with."""
    try:
        msg = await nc.request(subjects.submit(prefix), encode(request), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise APIError(
            503, "No coordinator is running", code="unavailable", retry_after=DEFAULT_RETRY_AFTER
        ) from None
    except nats.errors.TimeoutError:
        raise APIError(
            503,
            f"No answer from a coordinator within {timeout:g} s",
            code="unavailable",
            retry_after=DEFAULT_RETRY_AFTER,
        ) from None
    except nats.errors.Error as error:  # closed, reconnecting, stale connection…
        raise APIError(
            503, f"NATS unavailable: {error}", code="unavailable", retry_after=DEFAULT_RETRY_AFTER
        ) from None
    try:
        ack = decode_reply(msg.data, SubmitAck)
    except RemoteError as error:
        raise error_for_reply(error) from None
    except WireError as error:
        log.error("malformed reply to SubmitRequest %s: %s", request.request_id, error)
        raise APIError(500, f"malformed reply from the coordinator: {error}", code="bad_message") from None
    if ack.request_id != request.request_id:
        raise APIError(
            500, f"the coordinator acknowledged {ack.request_id!r} instead of {request.request_id!r}"
        )
    return ack


async def abort(nc: NATS, prefix: str, instance_id: str, request_ids: list[str], reason: str) -> None:
    """Ask the instance to drop these requests and free their KV blocks (best effort: logged on failure)."""
    try:
        await nc.publish(
            subjects.instance_abort(prefix, instance_id),
            encode(AbortRequest(request_ids=request_ids, reason=reason)),
        )
    except (nats.errors.Error, ValueError) as error:
        log.warning("could not abort %s on instance %s: %s", request_ids, instance_id, error)
