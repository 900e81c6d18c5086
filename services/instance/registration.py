"""Joining the cluster: RegisterInstance on `{prefix}.register`, repeated until a coordinator accepts.

The coordinator may start after the instance, restart, or refuse for a while, so every failure (no
responder, timeout, refusal, a bad reply) is logged and retried after `interval` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS

from shared import subjects
from shared.messages import InstanceInfo, RegisterAck, RegisterInstance, RemoteError, decode_reply
from shared.wire import WireError, encode

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = 2.0  # seconds to wait for one RegisterAck (the coordinator writes Redis before answering)
LOG_EVERY = 20


async def register_until_accepted(
    nc: NATS, prefix: str, info: Callable[[], InstanceInfo], interval: float
) -> RegisterAck:
    """Register with a coordinator; returns its accepting RegisterAck. Cancel to give up."""
    subject = subjects.register(prefix)
    attempt = 0
    while True:
        attempt += 1
        # A warning every LOG_EVERY attempts: a coordinator down for minutes would otherwise flood the log.
        level = logging.WARNING if attempt % LOG_EVERY == 1 else logging.DEBUG
        try:
            reply = await nc.request(subject, encode(RegisterInstance(info=info())), timeout=REGISTER_TIMEOUT)
            ack = decode_reply(reply.data, RegisterAck)
        except nats.errors.NoRespondersError:
            log.log(level, "no coordinator answers on %s yet; retrying every %.1fs", subject, interval)
        except nats.errors.TimeoutError:
            log.log(level, "registration timed out after %.1fs; retrying", REGISTER_TIMEOUT)
        except RemoteError as exc:
            log.log(level, "registration failed: %s", exc)
        except WireError as exc:
            log.log(level, "malformed RegisterAck: %s", exc)
        except nats.errors.Error as exc:  # connection trouble: nats-py reconnects on its own
            log.log(level, "registration request failed: %r", exc)
        else:
            if ack.accepted:
                log.debug("registered (attempt %d): %s", attempt, ack.message or "accepted")
                return ack
            log.log(level, "registration refused: %s", ack.message or "no reason given")
        await asyncio.sleep(interval)
