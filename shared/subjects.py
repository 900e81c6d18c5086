"""NATS subject names, all under one configurable prefix so several clusters can share a NATS server.

Every function takes the prefix first (services pass `config.prefix`). Ids embedded in subjects are checked:
a dot, space or wildcard inside an id would silently change which subscribers a message reaches.
"""

from __future__ import annotations

import re

from shared.messages import InstanceSubjects

DEFAULT_PREFIX = "ecoserve"
COORDINATOR_QUEUE = "coordinators"  # queue group: each request on a shared subject reaches one coordinator

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_id(kind: str, value: str) -> str:
    """Return `value` if it can be used as one subject token (and one Redis key segment), else ValueError."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '-' or '_' "
            "(no spaces, dots, ':' or wildcards '*' '>')"
        )
    return value


def check_prefix(prefix: str) -> str:
    """A prefix is one or more dot-separated ids ("ecoserve", "staging.ecoserve")."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"invalid prefix {prefix!r}: must be a non-empty string")
    for token in prefix.split("."):
        check_id("prefix token", token)
    return prefix


def submit(prefix: str, macro_instance_id: str | None = None) -> str:
    """Router → coordinator requests; without an id, any coordinator of the COORDINATOR_QUEUE group."""
    if macro_instance_id is None:
        return f"{check_prefix(prefix)}.submit"
    return f"{check_prefix(prefix)}.submit.{check_id('macro_instance_id', macro_instance_id)}"


def submit_all(prefix: str) -> str:
    """Wildcard over every macro instance's submit subject (one coordinator serving several)."""
    return f"{check_prefix(prefix)}.submit.*"


def instance_requests(prefix: str, instance_id: str) -> str:
    """Coordinator → instance DispatchRequests."""
    return f"{check_prefix(prefix)}.instance.{check_id('instance_id', instance_id)}.requests"


def instance_abort(prefix: str, instance_id: str) -> str:
    """Router → instance AbortRequests."""
    return f"{check_prefix(prefix)}.instance.{check_id('instance_id', instance_id)}.abort"


def instance_control(prefix: str, instance_id: str) -> str:
    """Coordinator → instance control commands (phase, drain)."""
    return f"{check_prefix(prefix)}.instance.{check_id('instance_id', instance_id)}.control"


def instance_subjects(prefix: str, instance_id: str) -> InstanceSubjects:
    """The three subjects an instance listens on, as announced in its InstanceInfo."""
    return InstanceSubjects(
        requests=instance_requests(prefix, instance_id),
        abort=instance_abort(prefix, instance_id),
        control=instance_control(prefix, instance_id),
    )


def router_tokens(prefix: str, router_id: str) -> str:
    """Instance → router TokenChunks for every request that router owns (its requests' reply_subject)."""
    return f"{check_prefix(prefix)}.router.{check_id('router_id', router_id)}.tokens"


def status(prefix: str, instance_id: str) -> str:
    """Instance → coordinator InstanceStatus reports (per instance, so a coordinator can pick its own)."""
    return f"{check_prefix(prefix)}.status.{check_id('instance_id', instance_id)}"


def status_all(prefix: str) -> str:
    """Wildcard over every instance's status subject."""
    return f"{check_prefix(prefix)}.status.*"


def register(prefix: str) -> str:
    """Instance → coordinator RegisterInstance (request/reply, COORDINATOR_QUEUE group)."""
    return f"{check_prefix(prefix)}.register"


def deregister(prefix: str) -> str:
    """Instance → coordinator DeregisterInstance."""
    return f"{check_prefix(prefix)}.deregister"


def admin(prefix: str) -> str:
    """Operator tool → coordinator AdminRequests (request/reply)."""
    return f"{check_prefix(prefix)}.admin"


def cluster_changed(prefix: str) -> str:
    """Coordinator → routers ClusterChanged broadcasts."""
    return f"{check_prefix(prefix)}.cluster.changed"


def instance_lost(prefix: str) -> str:
    """Coordinator → routers InstanceLost broadcasts: fail the streams of a dead instance."""
    return f"{check_prefix(prefix)}.cluster.instance_lost"


def instance_kv(prefix: str, instance_id: str) -> str:
    """FuDG prefill instance → decode instance: KvChunks of a KvTransfer (the last one is a request answered
    by KvTransferAck)."""
    return f"{check_prefix(prefix)}.instance.{check_id('instance_id', instance_id)}.kv"


def kv_transfers(prefix: str) -> str:
    """FuDG prefill instances → anyone listening (benchmarks, operators): a KvTransferReport per transfer."""
    return f"{check_prefix(prefix)}.fudg.transfers"
