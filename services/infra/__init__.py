"""Infrastructure the services run on: embedded NATS and Redis servers for local runs and tests."""

from services.infra.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    MissingBinaryError,
    start_nats,
    start_redis,
)

__all__ = ["EmbeddedServer", "EmbeddedServerError", "MissingBinaryError", "start_nats", "start_redis"]
