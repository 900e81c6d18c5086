"""`python -m services.coordinator`: run one coordinator until SIGTERM or SIGINT (then exit 0)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from services.coordinator.scheduling_config import scheduling_defaults
from services.coordinator.service import CoordinatorService
from shared.config import CoordinatorConfig

log = logging.getLogger("services.coordinator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.coordinator",
        description="ecoserve coordinator: instance registry, request dispatch, admin commands",
    )
    CoordinatorConfig.add_arguments(parser)
    return parser


async def serve(config: CoordinatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = CoordinatorService(config)
    await service.start()
    role = "leader" if service.is_leader else "standby"
    log.info("coordinator %s started as %s (prefix %s)", config.coordinator_id, role, config.prefix)
    try:
        await stop.wait()
    finally:
        await service.stop()
    log.info("coordinator %s stopped", config.coordinator_id)


def _runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform
        return asyncio.run
    return uvloop.run


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        config = CoordinatorConfig.from_args(parser.parse_args(argv))
        scheduling_defaults(config)  # a bad scheduling flag is a usage error, found before connecting
    except ValueError as error:  # a bad $ECOSERVE_* value or flag
        print(f"coordinator: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        _runner()(serve(config))
    except Exception as error:
        log.error("coordinator failed: %s: %s", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
