"""What a running router holds (connections, the served model, metrics) and the aiohttp AppKeys to find it."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from aiohttp import web
from nats.aio.client import Client as NATS

from services.router.cluster import ClusterView
from services.router.metrics import RouterMetrics
from services.router.served_model import ServedModel
from services.router.token_streams import TokenStreams
from services.router.token_text import TokenText
from shared.config import RouterConfig


@dataclass(frozen=True)
class RouterRuntime:
    config: RouterConfig
    model: ServedModel
    token_text: TokenText
    nc: NATS
    redis: aioredis.Redis
    streams: TokenStreams
    cluster: ClusterView
    metrics: RouterMetrics

    @property
    def prefix(self) -> str:
        return self.config.prefix


CONFIG = web.AppKey("ecoserve_router_config", RouterConfig)
METRICS = web.AppKey("ecoserve_router_metrics", RouterMetrics)
RUNTIME = web.AppKey("ecoserve_router_runtime", RouterRuntime)  # set once startup has connected
