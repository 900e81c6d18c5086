"""CORS, with vLLM's defaults (`--allowed-origins '*'`): a web page on any origin may call the API.

A browser first sends a preflight (OPTIONS with `Access-Control-Request-Method`) and no credentials, so it is
answered here, before the API-key check; the real request then needs the key as usual. Every response to a
request with an `Origin` the configuration allows carries `Access-Control-Allow-Origin`, set as the response
is prepared so that streamed (SSE) responses get it too. An empty origin list turns CORS off.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from services.router.errors import Handler

PREFLIGHT_MAX_AGE = 600  # seconds a browser may cache a preflight answer


def parse_origins(text: str) -> frozenset[str]:
    return frozenset(origin.strip() for origin in text.split(",") if origin.strip())


def allowed_origin(origin: str | None, origins: frozenset[str]) -> str | None:
    """The Access-Control-Allow-Origin value for a request from `origin`, or None."""
    if not origin or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def cors_middleware(origins: frozenset[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if allowed_origin(origin, origins) is None:
                return web.Response(status=403)  # the browser then refuses the real request
            headers = {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"
                ),
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE),
            }
            return web.Response(status=204, headers=headers)
        return await handler(request)

    return middleware


def cors_headers(origins: frozenset[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` signal handler: the allow-origin header on every response it applies to."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        allowed = allowed_origin(request.headers.get("Origin"), origins)
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            if allowed != "*":
                response.headers.add("Vary", "Origin")

    return on_prepare
