"""`python -m services.instance` (and `ecoserve instance`): one instance process.

Loads the model, starts the engine and the service (which first measures the engine's prefill profile when
the policy is padg, or with --profile-prefill on; cached on disk), and runs until SIGTERM/SIGINT or a
`shutdown` command; then drains (up to --drain-timeout seconds), deregisters and exits 0 (1 if the engine
died, 2 on bad arguments or a model that cannot be loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

from services.cli import add_engine_args, engine_config_from_args
from services.instance.service import InstanceService
from shared.config import InstanceConfig

log = logging.getLogger("services.instance")

DEFAULT_MODEL_NAME = "smollm2"  # what --model means when it is not given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecoserve instance", description="Run one ecoserve instance: an engine serving over NATS."
    )
    InstanceConfig.add_arguments(parser)
    add_engine_args(parser)
    return parser


async def serve(service: InstanceService) -> int:
    """Run `service` until a signal or a shutdown command has shut it down; returns the exit code."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    started = False

    def on_signal(name: str) -> None:
        if started:
            service.request_shutdown(name)
        else:  # still connecting: nothing to drain
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await service.start()
        started = True
        await service.wait_stopped()
    except asyncio.CancelledError:
        log.info("interrupted while starting")
        await service.engine.shutdown()
        return 0
    return service.exit_code


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (no Windows build)
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = InstanceConfig.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if config.fudg_role != "none" and args.policy == "padg":
        # PaDG's prefill windows and FuDG's roles are two answers to the same interference: not both.
        parser.error(f"--fudg-role {config.fudg_role} needs --policy nodg or sarathi, not padg")
    level = logging.getLevelName(config.log_level.upper())
    if not isinstance(level, int):
        parser.error(f"unknown log level {config.log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported here so `--help` answers without loading torch.
    import torch

    from services.instance.engine.async_engine import AsyncEngine
    from services.instance.engine.llm_engine import LLMEngine
    from services.instance.models.loader import ModelError
    from services.instance.startup_profile import default_cache_dir

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    engine_config = engine_config_from_args(args)
    if config.fudg_role == "prefill":  # every request leaves after its first token, with its KV
        engine_config = dataclasses.replace(engine_config, kv_export=True)
    try:
        engine = LLMEngine.from_pretrained(
            args.model, dtype=args.dtype, device=args.device, config=engine_config
        )
    except (ModelError, ValueError, OSError) as exc:
        print(f"ecoserve instance: {exc}", file=sys.stderr)
        return 2
    model_name = config.served_model_name or args.model or DEFAULT_MODEL_NAME
    service = InstanceService(
        config,
        AsyncEngine(engine, clock=time.time),
        model_name,
        profile_cache_dir=default_cache_dir(),
    )
    attach_fudg_role(service, config.fudg_role)
    return _run(serve(service))


def attach_fudg_role(service: InstanceService, role: str) -> None:
    """Give the service its FuDG role (before `start`, which subscribes the decode role's KV subject)."""
    from services.instance.fudg import DecodeRole, PrefillRole

    if role == "prefill":
        service.fudg_prefill = PrefillRole(service)
    elif role == "decode":
        service.fudg_decode = DecodeRole(service)


if __name__ == "__main__":
    sys.exit(main())
