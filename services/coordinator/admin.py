"""Admin commands: a `nats.micro` service (discoverable with `nats micro ls`, with request stats) whose
endpoints listen on `{prefix}.admin.<command>`; the contract is in admin_api.py.

Only the lease holder runs it, so whoever answers is the coordinator acting for the cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats import micro
from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import Service

from services.coordinator.admin_api import COMMANDS, SERVICE_NAME, SERVICE_VERSION, endpoint_subject
from services.coordinator.leader import Leader
from services.coordinator.registry import InstanceRecord, UnknownInstance
from services.coordinator.scaling import SPARE_POOL, ScalingController, ScalingError
from services.coordinator.scaling_admin import ScalingCommands
from services.coordinator.scaling_settings import SettingsError
from services.coordinator.scheduling_config import ConfigError
from services.infra.nats_sync import synced
from shared import subjects
from shared.messages import AdminReply, AdminRequest, ErrorReply
from shared.wire import Message, WireError, decode, encode

log = logging.getLogger(__name__)


class AdminError(Exception):
    """A command that cannot be done as asked; its message goes back in AdminReply.error."""


def instance_summary(record: InstanceRecord, position: int, now: float, inflight: int = 0) -> dict[str, Any]:
    status = record.status
    return {
        "instance_id": record.instance_id,
        "macro_instance_id": record.macro_instance_id,
        "position": position,  # 1-based place in the macro instance's rolling order
        "state": record.state,
        "reported_state": status.state if status else None,
        "dispatchable": record.dispatchable,
        "phase": status.phase if status else None,
        "num_running": status.num_running if status else 0,
        "num_waiting": status.num_waiting if status else 0,
        "outstanding": len(record.pending),
        "inflight": inflight,  # dispatched here and not yet seen finished
        "kv_blocks_free": status.kv_blocks_free if status else None,
        "kv_blocks_total": record.info.kv_blocks_total,
        "last_heartbeat_age": round(now - record.last_heartbeat, 3),
        "model": record.info.model,
        "policy": record.info.policy,
        "role": record.info.role,  # FuDG: prefill / decode; "mixed" otherwise
        "prefill_window": status.prefill_window if status else None,  # padg policy: window open?
        "window_epoch": status.window_epoch if status else None,
        "host": record.info.host,
        "pid": record.info.pid,
    }


class AdminService:
    def __init__(self, nc: NATS, leader: Leader, scaling: ScalingController | None = None):
        self.nc = nc
        self.leader = leader
        # Mitosis scaling's commands; without a controller they answer that scaling is not running.
        self.scaling = ScalingCommands(scaling, leader.update_config) if scaling is not None else None
        self._service: Service | None = None
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "status": self._status,
            "instances": self._instances,
            "drain": self._drain,
            "resume": self._resume,
            "remove": self._remove,
            "config-get": self._config_get,
            "config-set": self._config_set,
            "add-instance": self._scaling_command(ScalingCommands.add_instance),
            "remove-instance": self._scaling_command(ScalingCommands.remove_instance),
            "scaling-get": self._scaling_command(ScalingCommands.get),
            "scaling-set": self._scaling_command(ScalingCommands.set),
        }

    async def start(self) -> None:
        self._service = await micro.add_service(
            self.nc,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description="ecoserve coordinator administration",
            metadata={"prefix": self.leader.prefix, "coordinator_id": self.leader.coordinator_id},
            queue_group=subjects.COORDINATOR_QUEUE,
        )
        for command in COMMANDS:
            await self._service.add_endpoint(
                name=command,
                subject=endpoint_subject(self.leader.prefix, command),
                handler=self._handler(command),
            )
        await synced(self.nc)

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
            self._service = None

    def _handler(self, command: str) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            await request.respond(encode(await self._answer(command, request.data)))

        return handle

    async def _answer(self, command: str, data: bytes) -> Message:
        try:
            admin_request = decode(data, AdminRequest)
        except WireError as error:
            return ErrorReply.from_wire_error(error)
        if admin_request.command != command:
            return AdminReply(
                ok=False, error=f"command {admin_request.command!r} sent to the {command!r} endpoint"
            )
        try:
            return AdminReply(ok=True, result=await self._commands[command](admin_request.args))
        except (AdminError, UnknownInstance, ConfigError, ScalingError, SettingsError) as error:
            return AdminReply(ok=False, error=str(error))
        except Exception as error:
            log.exception("admin command %s failed", command)
            return ErrorReply(code="internal", message=f"{command} failed: {type(error).__name__}: {error}")

    # ---- commands ----

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        registry = self.leader.registry
        return {
            "coordinator_id": self.leader.coordinator_id,
            "leader": True,
            "time": time.time(),
            "macro_instances": [
                {
                    "macro_instance_id": macro,
                    "members": registry.members(macro),
                    **self.leader.macro_summary(macro),  # dispatch policy; PaDG: activation, epoch, queue
                }
                for macro in registry.macro_instances()
                if macro != SPARE_POOL  # the spare pool is listed under "scaling"
            ],
            "instances": self._summaries(),
            "inflight_requests": len(self.leader.inflight),
            "config": self.leader.scheduling.to_dict(),
            **(await self.scaling.status_section() if self.scaling is not None else {}),
        }

    def _scaling_command(
        self, command: Callable[[ScalingCommands, dict[str, Any]], Awaitable[dict[str, Any]]]
    ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def run(args: dict[str, Any]) -> dict[str, Any]:
            if self.scaling is None:
                raise AdminError("mitosis scaling is not running in this coordinator")
            return await command(self.scaling, args)

        return run

    async def _instances(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"instances": self._summaries()}

    def _summaries(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        registry = self.leader.registry
        return [
            instance_summary(
                record,
                registry.members(record.macro_instance_id).index(record.instance_id) + 1,
                now,
                inflight=len(self.leader.inflight.of(record.instance_id)),
            )
            for record in registry
        ]

    async def _drain(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.leader.set_state(_instance_id(args), "draining", "drain")

    async def _resume(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.leader.set_state(_instance_id(args), "ready", "resume")

    async def _remove(self, args: dict[str, Any]) -> dict[str, Any]:
        # No new requests from now on; the instance finishes what it holds, deregisters and exits.
        result = await self.leader.set_state(_instance_id(args), "draining", "shutdown")
        return {**result, "state": "removing"}

    async def _config_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"config": self.leader.scheduling.to_dict(), "keys": self.leader.scheduling.keys()}

    async def _config_set(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args:
            raise AdminError(
                "config-set needs at least one key (known: " + ", ".join(self.leader.scheduling.keys()) + ")"
            )
        config = await self.leader.update_config(args)
        log.info("configuration changed: %s", args)
        return {"config": config.to_dict(), "changed": sorted(args)}


def _instance_id(args: dict[str, Any]) -> str:
    value = args.get("instance_id")
    if value is None:
        raise AdminError("missing argument 'instance_id'")
    if not isinstance(value, str):
        raise AdminError(f"argument 'instance_id' must be a string, got {type(value).__name__}")
    return value
