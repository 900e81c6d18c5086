"""The router's aiohttp application: routes, middlewares, and the startup/cleanup of its connections.

`create_app` builds the app without touching the network; the cleanup context, run by `AppRunner.setup()`
(or `web.run_app`), loads the tokenizer, connects NATS and Redis, subscribes to this router's token subject
and the cluster broadcasts, and undoes all of it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import nats
import redis.asyncio as aioredis
from aiohttp import web
from nats.aio.msg import Msg
from redis.exceptions import RedisError

from services.router.auth import auth_middleware
from services.router.cluster import ClusterView
from services.router.cors import cors_headers, cors_middleware, parse_origins
from services.router.errors import error_middleware
from services.router.handlers import handle_chat, handle_completions
from services.router.info import handle_health, handle_metrics, handle_model, handle_models
from services.router.metrics import RouterMetrics
from services.router.runtime import CONFIG, METRICS, RUNTIME, RouterRuntime
from services.router.served_model import build_served_model
from services.router.token_streams import TokenStreams
from services.router.token_text import TokenText
from shared import subjects
from shared.config import RouterConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # long prompts sent as token-id arrays run to megabytes
CLUSTER_CACHE_SECONDS = 1.0  # how long a read of the instance table is reused (ClusterChanged drops it early)


def create_app(
    config: RouterConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> web.Application:
    """The router app for `config`; `tokenizer` skips loading one from `config.model` (tests)."""
    metrics = RouterMetrics()

    def count_error(status: int) -> None:
        metrics.http_errors.labels(status=str(status)).inc()

    origins = parse_origins(config.allowed_origins)
    # Outermost first: every error becomes JSON; a CORS preflight is answered before the key is checked.
    middlewares = [error_middleware(count_error), cors_middleware(origins)]
    if config.api_key:
        middlewares.append(auth_middleware(config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(cors_headers(origins))
    app[CONFIG] = config
    app[METRICS] = metrics
    app.cleanup_ctx.append(_runtime_context(tokenizer))
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model:.+}", handle_model)  # ids may hold slashes (org/name)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app


def _runtime_context(
    tokenizer: PreTrainedTokenizerBase | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        # Off the event loop: resolving the default model may run a child process, and loading takes ~1 s.
        model = await asyncio.to_thread(
            build_served_model, config.model, served_model_name=config.served_model_name, tokenizer=tokenizer
        )
        closing = False

        async def on_disconnected() -> None:
            if not closing:  # closing the connection at shutdown reports a disconnect too
                log.warning("disconnected from NATS; reconnecting")

        nc = await nats.connect(
            config.nats_url,
            name=f"ecoserve-{config.router_id}",
            connect_timeout=5,
            max_reconnect_attempts=-1,  # a router outlives NATS restarts; requests meanwhile get 503
            reconnect_time_wait=0.5,
            error_cb=_log_nats_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=_log_reconnected,
        )
        redis = aioredis.Redis.from_url(config.redis_url, socket_connect_timeout=2, socket_timeout=5)
        streams = TokenStreams(nc, config.prefix, config.router_id)
        try:
            try:
                await redis.ping()
            except (RedisError, OSError) as error:
                # Not fatal: Redis only feeds /health and the context length; both report it until it is back.
                log.warning("Redis at %s is not reachable yet: %s", config.redis_url, error)
            await streams.start()
            cluster = ClusterView(redis, config.prefix, ttl=CLUSTER_CACHE_SECONDS)

            async def on_cluster_changed(msg: Msg) -> None:
                cluster.invalidate()

            changed = await nc.subscribe(subjects.cluster_changed(config.prefix), cb=on_cluster_changed)
            app[RUNTIME] = RouterRuntime(
                config=config,
                model=model,
                token_text=TokenText(model.tokenizer),
                nc=nc,
                redis=redis,
                streams=streams,
                cluster=cluster,
                metrics=app[METRICS],
            )
            log.info(
                "router %s serving model %r (%s) on prefix %r",
                config.router_id,
                model.name,
                model.root,
                config.prefix,
            )
            yield
            await changed.unsubscribe()
            await cluster.aclose()
            await streams.stop()
        finally:
            closing = True
            await nc.close()
            await redis.aclose()

    return context


async def _log_nats_error(error: Exception) -> None:
    log.warning("NATS error: %s", error)


async def _log_reconnected() -> None:
    log.info("reconnected to NATS")
