"""API-key check for the OpenAI endpoints (`/v1/*`), as vLLM's `--api-key`; /health and /metrics stay open
so load balancers and Prometheus need no secret."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.router.errors import APIError, Handler

PROTECTED_PREFIX = "/v1/"


def auth_middleware(api_key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIX) and request.method != "OPTIONS":
            given = request.headers.get("Authorization", "").strip().encode("utf-8", "surrogateescape")
            # Constant-time comparison: the time to reject must not reveal how much of the key matched.
            if not hmac.compare_digest(given, expected):
                raise APIError(
                    401,
                    "Invalid or missing API key (send `Authorization: Bearer <key>`)",
                    code="invalid_api_key",
                )
        return await handler(request)

    return middleware
