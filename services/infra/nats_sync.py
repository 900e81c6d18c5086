"""Waiting until the NATS server has processed what this client sent (subscriptions, unsubscriptions).

nats-py 2.16's `flush()` writes its PING straight to the socket while earlier commands (SUB, UNSUB) may still
sit in the client's pending buffer, so the PONG can come back before the server has seen them: a request sent
right after `subscribe(); flush()` then gets "no responders" now and then. A second flush is ordered after the
first PONG, by which time the flusher task has written the buffer.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS


async def synced(nc: NATS, timeout: float = 2.0) -> None:
    """Return once the server has processed every command sent before the call."""
    for _ in range(2):
        await nc.flush(timeout=timeout)  # type: ignore[arg-type]
