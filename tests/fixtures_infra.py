"""Real NATS and Redis for tests: one embedded server of each per session, fresh clients per test.

Tests sharing the servers stay apart by using `ecoserve_prefix` for every subject and key they touch.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from services.infra.embedded import EmbeddedServer, start_nats, start_redis


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """nats-server on a free loopback port, with JetStream (stored under the session's tmp dir)."""
    with start_nats(jetstream_dir=tmp_path_factory.mktemp("nats-jetstream")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedServer]:
    """redis-server on a free loopback port, without persistence."""
    with start_redis() as server:
        yield server


@pytest.fixture
def ecoserve_prefix() -> str:
    """A subject/key prefix of this test's own, so tests sharing the servers never see each other's data."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def nats_client(nats_server: EmbeddedServer) -> AsyncIterator[NATS]:
    """A connected nats-py client (no reconnects: a lost server should fail the test, not stall it)."""
    client = await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=5)
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture
async def redis_client(redis_server: EmbeddedServer) -> AsyncIterator[aioredis.Redis]:
    """A redis.asyncio client returning bytes (values are msgpack)."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
