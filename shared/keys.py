"""The Redis key layout, in one place: `<prefix>:<what>[:<id>[:<part>]]`.

Values that are messages (InstanceInfo) are stored msgpack-encoded with shared.wire, like on NATS.
Ids are checked with the same rule as subject tokens, which excludes ':' so keys cannot collide.
"""

from __future__ import annotations

from shared.subjects import check_id, check_prefix


def instances(prefix: str) -> str:
    """Hash: instance_id → encoded InstanceInfo of every registered instance."""
    return f"{check_prefix(prefix)}:instances"


def instance_lease(prefix: str, instance_id: str) -> str:
    """String with a TTL, refreshed by the instance's status reports; gone means the instance is dead."""
    return f"{check_prefix(prefix)}:instance:{check_id('instance_id', instance_id)}:lease"


def macro_instances(prefix: str) -> str:
    """Set of macro_instance_ids."""
    return f"{check_prefix(prefix)}:macros"


def macro_members(prefix: str, macro_instance_id: str) -> str:
    """List of instance_ids in rolling-activation order (the prefill window passes along it, cyclically)."""
    return f"{check_prefix(prefix)}:macro:{check_id('macro_instance_id', macro_instance_id)}:members"


def macro_state(prefix: str, macro_instance_id: str) -> str:
    """Hash a coordinator resumes from: `epoch` (membership/state changes), `state:<id>` (ready/draining), and
    PaDG's `active` (prefill instance), `window_epoch`, `window_opened_at`, `windows:<id>` (windows opened).
    """
    return f"{check_prefix(prefix)}:macro:{check_id('macro_instance_id', macro_instance_id)}:state"


def coordinator_lease(prefix: str, macro_instance_id: str) -> str:
    """String (SET NX PX) naming the coordinator that owns the macro instance; standbys wait for expiry."""
    return f"{check_prefix(prefix)}:macro:{check_id('macro_instance_id', macro_instance_id)}:coordinator"


def config(prefix: str) -> str:
    """Hash: cluster-wide settings that admin commands change at run time (SLOs, N_l, N_u, variants)."""
    return f"{check_prefix(prefix)}:config"


def scaling_events(prefix: str) -> str:
    """Stream: one entry per mitosis decision (expand, contract, split, merge), for audit and plots."""
    return f"{check_prefix(prefix)}:events:scaling"
