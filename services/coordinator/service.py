"""The coordinator process: connections, leader election, and the switch between standby and leader.

Every coordinator competes for the macro instance's lease in Redis. The holder runs a `Leader` (and the
admin service) and renews the lease every third of its TTL; the others poll it. A holder that cannot renew
steps down before its lease can have expired in Redis, so two coordinators never act at once. A new holder
reloads membership, order, configuration and the PaDG activation from Redis; per-request load it
relearns from status reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from redis.exceptions import RedisError

from services.coordinator.admin import AdminService
from services.coordinator.leader import Leader
from services.coordinator.lease import CoordinatorLease
from services.coordinator.registry import DEFAULT_MACRO_INSTANCE
from services.coordinator.scaling_ops import load_settings
from services.coordinator.scheduling_config import scheduling_defaults
from services.coordinator.store import Store
from services.infra.nats_sync import synced
from shared import keys
from shared.config import CoordinatorConfig

log = logging.getLogger(__name__)


NATS_CONNECT_TIMEOUT = 10.0  # seconds to find the server at start; afterwards reconnect for ever


async def _connect_nats(url: str, name: str) -> NATS:
    async def on_error(error: Exception) -> None:
        log.warning("NATS: %s", error)

    # nats-py retries the first connection as often as reconnects; bound it so a wrong URL fails fast.
    try:
        return await asyncio.wait_for(
            nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                error_cb=on_error,
            ),
            NATS_CONNECT_TIMEOUT,
        )
    except TimeoutError:
        raise ConnectionError(f"no NATS server at {url} within {NATS_CONNECT_TIMEOUT}s") from None


class CoordinatorService:
    def __init__(self, config: CoordinatorConfig, *, macro_instance_id: str = DEFAULT_MACRO_INSTANCE):
        self.config = config
        self.macro_instance_id = macro_instance_id
        self._scheduling_defaults = scheduling_defaults(config)  # ConfigError now, not at every election
        ttl = config.coordinator_lease_seconds
        self._renew_interval = ttl / 3
        self._poll_interval = max(0.05, ttl / 4)
        self._nc: NATS | None = None
        self._redis: aioredis.Redis | None = None
        self._lease: CoordinatorLease | None = None
        self._leader: Leader | None = None
        self._admin: AdminService | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._leadership = asyncio.Event()  # set while leading

    @property
    def coordinator_id(self) -> str:
        return self.config.coordinator_id

    @property
    def is_leader(self) -> bool:
        return self._leader is not None

    @property
    def leader(self) -> Leader | None:
        return self._leader

    async def start(self) -> None:
        """Connect, and lead at once if the lease is free (otherwise stand by in the background)."""
        ttl = self.config.coordinator_lease_seconds
        self._nc = await _connect_nats(self.config.nats_url, f"ecoserve-coordinator-{self.coordinator_id}")
        # Short socket timeouts: a hung Redis call must not outlast the lease it is trying to renew.
        timeout = min(2.0, max(0.2, ttl / 3))
        try:
            self._redis = aioredis.Redis.from_url(
                self.config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except ValueError:  # a malformed URL
            await self._nc.close()
            raise
        lease_key = keys.coordinator_lease(self.config.prefix, self.macro_instance_id)
        self._lease = CoordinatorLease(self._redis, lease_key, self.coordinator_id, ttl)
        await self._try_to_lead()
        self._run_task = asyncio.create_task(self._run(), name=f"coordinator-{self.coordinator_id}")

    async def stop(self) -> None:
        """Step down (releasing the lease so a standby takes over at once) and disconnect."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._run_task is not None:
            await self._run_task
        await self._step_down(release=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def wait_leader(self, timeout: float) -> None:
        """Until this coordinator leads (TimeoutError after `timeout` seconds)."""
        await asyncio.wait_for(self._leadership.wait(), timeout)

    # ---- election ----

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._election_step()
            except Exception:
                # Never let the election loop die: a coordinator that stops renewing must also stop acting.
                log.exception("coordinator election step failed")
                await self._step_down(release=False)
                await self._pause(self._poll_interval)

    async def _election_step(self) -> None:
        """One turn: a standby tries to take the lease; a leader waits, then renews or steps down."""
        if self._leader is None:
            if not await self._try_to_lead():
                await self._pause(self._poll_interval)
            return
        assert self._lease is not None
        await self._pause(min(self._renew_interval, max(0.0, self._lease.remaining())))
        if self._stopping.is_set():
            return
        if not await self._renew():
            log.warning("coordinator %s lost the lease; standing by", self.coordinator_id)
            await self._step_down(release=False)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _renew(self) -> bool:
        assert self._lease is not None
        try:
            return await asyncio.wait_for(self._lease.renew(), max(0.05, self._lease.remaining()))
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("lease renewal failed: %s", error)
            return self._lease.held

    async def _try_to_lead(self) -> bool:
        assert self._lease is not None and self._redis is not None and self._nc is not None
        try:
            if not await self._lease.acquire():
                return False
        except (RedisError, OSError) as error:
            log.warning("cannot reach Redis for the coordinator lease: %s", error)
            return False
        store = Store(self._redis, self.config.prefix)
        try:
            snapshot = await store.load()
            scaling_settings = await load_settings(self._redis, self.config.prefix)
        except (RedisError, OSError) as error:
            log.error("took the lease but could not load state: %s", error)
            await self._release()
            return False
        scheduling, problems = self._scheduling_defaults.with_stored(snapshot.config)
        for problem in snapshot.problems + problems:
            log.warning("ignored stored state: %s", problem)
        flags, stored = self._scheduling_defaults.to_dict(), scheduling.to_dict()
        for key in (k for k in flags if flags[k] != stored[k]):
            # Operators' config-set values outlive restarts; say so, or a changed flag looks ignored.
            log.info(
                "%s = %r set with `ecoserve admin config` overrides the flag's %r",
                key,
                stored[key],
                flags[key],
            )
        leader = Leader(
            nc=self._nc,
            store=store,
            prefix=self.config.prefix,
            coordinator_id=self.coordinator_id,
            scheduling=scheduling,
            snapshot=snapshot,
            scaling_settings=scaling_settings,
        )
        admin = AdminService(self._nc, leader, scaling=leader.scaling)
        try:
            await leader.start()
            await admin.start()
        except Exception:
            log.exception("could not start leading")
            await admin.stop()
            await leader.stop()
            await self._release()
            return False
        self._leader, self._admin = leader, admin
        self._leadership.set()
        log.info(
            "coordinator %s leads macro instance %s (%d instances reloaded)",
            self.coordinator_id,
            self.macro_instance_id,
            len(snapshot.instances),
        )
        return True

    async def _step_down(self, *, release: bool) -> None:
        leader, admin = self._leader, self._admin
        self._leader = self._admin = None
        self._leadership.clear()
        if admin is not None:
            await admin.stop()
        if leader is not None:
            await leader.stop()
        if self._nc is not None and self._nc.is_connected:
            # The server must have dropped our subscriptions before a successor can take the lease.
            with contextlib.suppress(Exception):
                await synced(self._nc, timeout=1)
        if release and leader is not None:
            await self._release()

    async def _release(self) -> None:
        assert self._lease is not None
        try:
            await self._lease.release()
        except (RedisError, OSError) as error:
            log.warning("could not release the lease (it expires by itself): %s", error)
