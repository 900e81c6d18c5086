"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from services.router import openai_format as fmt
from services.router.cluster import ClusterSnapshot
from services.router.errors import APIError, error_body
from services.router.runtime import RUNTIME, RouterRuntime

DEFAULT_BLOCK_SIZE = 16


async def handle_models(request: web.Request) -> web.Response:
    return web.json_response(fmt.models_list(await _model_card(request)))


async def handle_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: the card of the served model (OpenAI's `models.retrieve`), else 404."""
    rt = request.app[RUNTIME]
    wanted = request.match_info["model"]
    if not rt.model.matches(wanted):
        raise APIError(404, f"The model `{wanted}` does not exist", param="model", code="model_not_found")
    return web.json_response(await _model_card(request))


async def _model_card(request: web.Request) -> dict[str, Any]:
    rt = request.app[RUNTIME]
    snapshot = await rt.cluster.snapshot()
    model = rt.model
    max_model_len = snapshot.max_model_len() or model.config_max_model_len
    return fmt.model_card(model.name, model.created, model.root, max_model_len)


def _unavailable(message: str) -> web.Response:
    return web.json_response(error_body(503, message, code="unavailable"), status=503)


async def handle_health(request: web.Request) -> web.Response:
    """200 when this router can reach NATS and Redis lists a live, ready instance; 503 otherwise."""
    rt = request.app[RUNTIME]
    if not rt.nc.is_connected:
        return _unavailable("the router is not connected to NATS")
    snapshot = await rt.cluster.snapshot()
    if snapshot.error is not None:
        return _unavailable(f"cannot read the instance table from Redis: {snapshot.error}")
    ready = snapshot.ready
    if not ready:
        return _unavailable(
            f"no instance can serve: {snapshot.registered} registered, {len(snapshot.live)} alive, none ready"
        )
    return web.json_response({"status": "ok", "model": rt.model.name, "ready_instances": len(ready)})


def _update_gauges(rt: RouterRuntime, snapshot: ClusterSnapshot) -> None:
    metrics, labels = rt.metrics, {"model_name": rt.model.name}
    metrics.ready_instances.set(len(snapshot.ready))
    statuses = [view.status for view in snapshot.live if view.status is not None]
    if statuses:
        running = sum(status.num_running for status in statuses)
        waiting = sum(status.num_waiting for status in statuses)
        total = sum(status.kv_blocks_total for status in statuses)
        used = total - sum(status.kv_blocks_free for status in statuses)
    else:
        # No status reports in Redis: what this router sees of its own requests (waiting = no token yet),
        # and their KV footprint against the live instances' pools.
        tracked = rt.streams.tracked()
        running = sum(1 for entry in tracked if entry.output_tokens > 0)
        waiting = len(tracked) - running
        block_size = snapshot.live[0].info.block_size if snapshot.live else DEFAULT_BLOCK_SIZE
        total = sum(view.info.kv_blocks_total for view in snapshot.live)
        used = sum(math.ceil((e.prompt_tokens + e.output_tokens) / max(1, block_size)) for e in tracked)
    metrics.running.labels(**labels).set(running)
    metrics.waiting.labels(**labels).set(waiting)
    metrics.kv_usage.labels(**labels).set(min(1.0, used / total) if total > 0 else 0.0)


async def handle_metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    _update_gauges(rt, await rt.cluster.snapshot())
    return web.Response(body=rt.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
