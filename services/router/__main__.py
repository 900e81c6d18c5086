"""`python -m services.router`: run one router (the RouterConfig flags).

Any number of routers may run against the same NATS and Redis; each gets its own id and token subject.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import nats.errors
from aiohttp import web

from services.router.app import create_app
from services.router.served_model import ModelSourceError
from shared.config import RouterConfig

log = logging.getLogger("services.router")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.router", description="ecoserve's OpenAI-compatible HTTP router"
    )
    RouterConfig.add_arguments(parser)
    return parser


async def serve(config: RouterConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    app = create_app(config)
    # handler_cancellation: a client that disconnects cancels its handler at once, which aborts its requests.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            shown = f"[{host}]" if ":" in host else host
            log.info(
                "ecoserve router listening on http://%s:%d (router id %s)", shown, port, config.router_id
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not available on Windows
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        config = RouterConfig.from_args(args)
    except ValueError as error:  # a bad environment default or an invalid id / port
        parser.error(str(error))
    level = logging.getLevelName(config.log_level.upper())
    if not isinstance(level, int):
        parser.error(f"unknown --log-level {config.log_level!r}")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        _run(serve(config))
    except ModelSourceError as error:
        log.error("%s", error)
        return 1
    except (OSError, TimeoutError, nats.errors.Error) as error:  # port in use, NATS unreachable…
        log.error("cannot start the router: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
