"""`ClusterOps` (scaling.py) on a Leader: how a scaling plan becomes registry, Redis and NATS changes; and
`load_settings` + `build_scaling`, which make a leader's ScalingController from what Redis holds.

The spare pool is the registry's pseudo macro instance `SPARE_POOL`; the admin state of a pool member says
which kind it is: `draining` (removed, finishing what it holds) or `ready` (an idle spare). An instance
keeps refusing dispatches from the time it is drained until it is moved into a macro instance again, when it
is told to resume. Nothing here touches a model or a KV cache: membership is all that changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from services.coordinator.registry import Registry
from services.coordinator.scaling import SPARE_POOL, Layout, ScalingController
from services.coordinator.scaling_log import ScalingLog
from services.coordinator.scaling_settings import ScalingSettings
from services.coordinator.scaling_store import ScalingStore
from shared import keys, subjects
from shared.messages import ClusterChanged
from shared.wire import encode

if TYPE_CHECKING:  # the leader imports this module
    from services.coordinator.leader import Leader

log = logging.getLogger(__name__)


class LeaderOps:
    def __init__(self, leader: Leader):
        self.leader = leader

    def layout(self) -> Layout:
        registry = self.leader.registry
        macros = {m: registry.members(m) for m in registry.macro_instances() if m != SPARE_POOL}
        pool = [registry.get(i) for i in registry.members(SPARE_POOL)]
        return Layout(
            macros=macros,
            spares=[r.instance_id for r in pool if r.state == "ready"],
            draining=[r.instance_id for r in pool if r.state == "draining"],
        )

    def holds_work(self, instance_id: str) -> bool:
        registry = self.leader.registry
        if instance_id not in registry:
            return False
        record = registry.get(instance_id)
        status = record.status
        if not record.confirmed or status is None:
            return True  # not heard from since this coordinator took over: unknown, so assume it does
        return status.num_running + status.num_waiting > 0 or bool(record.pending)

    async def move(self, macro_id: str, instance_ids: Sequence[str]) -> None:
        for instance_id in instance_ids:
            if instance_id not in self.leader.registry:
                continue  # gone meanwhile; the planner hears of it from `lost`
            from_pool = self.leader.registry.get(instance_id).macro_instance_id == SPARE_POOL
            await self.leader.move_instance(instance_id, macro_id)
            # Every pool member was told to drain (an idle spare too); a member an operator drained stays
            # drained when a split or merge moves it.
            if from_pool:
                result = await self.leader.set_state(instance_id, "ready", "resume")
                if not result["instance_acknowledged"]:
                    # It gets no requests until it reports ready; the next report shows whether it did.
                    log.warning("instance %s did not resume: %s", instance_id, result["instance_error"])

    async def drain(self, instance_id: str) -> None:
        if instance_id not in self.leader.registry:
            return
        # Drained first, so no request reaches it between leaving its macro instance and refusing them.
        await self.leader.set_state(instance_id, "draining", "drain")
        await self.leader.move_instance(instance_id, SPARE_POOL)

    async def spare(self, instance_id: str) -> None:
        registry = self.leader.registry
        if instance_id not in registry or registry.get(instance_id).macro_instance_id != SPARE_POOL:
            return
        # Not `set_state`: that would tell the instance to resume, and a spare takes no requests.
        registry.set_state(instance_id, "ready")
        await self.leader.store.save_state(instance_id, SPARE_POOL, "ready")

    async def retire_macro(self, macro_id: str) -> None:
        # Ids are never reused, so its keys can simply go (the registry dropped its empty member list).
        store = self.leader.store
        async with store.redis.pipeline(transaction=True) as pipe:
            pipe.srem(keys.macro_instances(store.prefix), macro_id)
            pipe.delete(keys.macro_members(store.prefix, macro_id), keys.macro_state(store.prefix, macro_id))
            await pipe.execute()

    async def changed(self, reason: str) -> None:
        message = ClusterChanged(reason=reason, time=time.time())
        await self.leader.nc.publish(subjects.cluster_changed(self.leader.prefix), encode(message))


async def load_settings(
    redis: aioredis.Redis, prefix: str, defaults: ScalingSettings | None = None
) -> ScalingSettings:
    """The stored scaling settings over `defaults` (entries that cannot be used are logged and skipped)."""
    settings, problems = await ScalingStore(redis, prefix).load(defaults or ScalingSettings())
    for problem in problems:
        log.warning("ignored stored scaling setting: %s", problem)
    return settings


def build_scaling(leader: Leader, settings: ScalingSettings) -> ScalingController:
    """The controller of a leader whose registry holds the restored membership: bounds from its scheduling
    configuration, events to the Redis stream; it listens to the PaDG hooks for TTFT and saved-TPOT
    samples."""
    scheduling = leader.scheduling
    config = settings.mitosis_config(
        n_lower=scheduling.n_lower, n_upper=scheduling.n_upper, ttft_slo=scheduling.ttft_slo
    )
    redis = leader.store.redis
    controller = ScalingController(
        LeaderOps(leader),
        config,
        settings,
        events=ScalingLog(redis, leader.prefix),
        store=ScalingStore(redis, leader.prefix),
    )
    leader.hooks.status_delta.append(controller.on_status_delta)
    leader.hooks.activation.append(controller.on_activation)
    return controller


def ready_members(registry: Registry) -> dict[str, int]:
    """Macro instance → members that can take a request now (the overall scheduler's weights)."""
    return {
        macro: sum(registry.get(i).dispatchable for i in registry.members(macro))
        for macro in registry.macro_instances()
        if macro != SPARE_POOL
    }
