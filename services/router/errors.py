"""OpenAI-style JSON errors: the exception handlers raise, and the middleware that renders every failure.

Body shape (what the `openai` client and vLLM users parse): `{"error": {"message", "type", "param", "code"}}`.
The middleware also turns aiohttp's own HTTP exceptions (unknown route, wrong method, body too large) and any
unexpected exception into that shape, so a client never sees an HTML page or a bare traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

# The OpenAI error `type` per status; the `openai` client picks its exception class from the status alone.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class APIError(Exception):
    """An HTTP error answer; `param` names the offending request field when there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            # Retry-After takes whole seconds; round up so a client never retries early.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error"),
            "param": param,
            "code": code,
        }
    }


def _from_http_exception(error: web.HTTPException) -> web.Response:
    if error.status == 404:
        message, code = "Not found: no such route", "route_not_found"
    elif error.status == 405:
        message, code = (
            f"Method not allowed (allowed: {error.headers.get('Allow', '')})",
            "method_not_allowed",
        )
    elif error.status == 413:
        message, code = "Request body too large", "request_too_large"
    else:
        message, code = error.reason, None
    response = web.json_response(error_body(error.status, message, code=code), status=error.status)
    if "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response


def error_middleware(on_error: Callable[[int], None]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware rendering errors as JSON; `on_error(status)` is told of every error response (metrics)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except APIError as error:
            response = error.response()
        except web.HTTPException as error:
            if error.status < 400:
                raise
            response = _from_http_exception(error)
        except Exception:
            # A bug, not bad input: log it with its traceback and answer with a JSON 500.
            log.exception("unhandled error serving %s %s", request.method, request.path)
            response = web.json_response(
                error_body(500, "Internal server error (logged by the router)", code="internal_error"),
                status=500,
            )
        if response.status >= 400:
            on_error(response.status)
        return response

    return middleware
