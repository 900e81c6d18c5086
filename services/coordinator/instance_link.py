"""Request/reply from the coordinator to one instance, with every way it can go wrong turned into a reason."""

from __future__ import annotations

from typing import cast

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from shared.messages import AdminReply, DispatchAck, ErrorReply
from shared.wire import Message, WireError, decode, encode

Answer = DispatchAck | AdminReply | ErrorReply


async def ask(nc: NATS, subject: str, request: Message, timeout: float) -> Answer | str:
    """The instance's decoded answer, or (a str) why there is none."""
    try:
        answer = await nc.request(subject, encode(request), timeout=timeout)
        return cast(Answer, decode(answer.data, (DispatchAck, AdminReply, ErrorReply)))
    except NoRespondersError:
        return "not listening"
    except TimeoutError:
        return f"no answer within {timeout}s"
    except WireError as error:
        return f"answered garbage: {error}"
