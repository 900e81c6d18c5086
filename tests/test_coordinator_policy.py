"""The coordinator's pure parts: registry (leases, membership order, outstanding load), in-flight tracking,
the LeastLoaded dispatch policy and scheduling-configuration validation. Time is injected everywhere."""

from __future__ import annotations

import dataclasses

import pytest
from coordinator_support import make_info, make_status

from services.coordinator.dispatch import (
    Candidate,
    Dispatch,
    LeastLoaded,
    Overloaded,
    Unavailable,
    make_policy,
)
from services.coordinator.inflight import Inflight, InflightTracker
from services.coordinator.registry import PENDING_REPORTS, Registry, UnknownInstance
from services.coordinator.scheduling_config import ConfigError, SchedulingConfig


def candidate(
    instance_id: str,
    *,
    ready: bool = True,
    running: int = 0,
    waiting: int = 0,
    outstanding: int = 0,
    kv_free: int = 100,
) -> Candidate:
    return Candidate(instance_id, ready, running, waiting, outstanding, kv_free)


# ---- LeastLoaded ----


def test_least_loaded_picks_min_running_waiting_outstanding() -> None:
    policy = LeastLoaded()
    candidates = [
        candidate("a", running=2),
        candidate("b", waiting=1, outstanding=2),
        candidate("c", running=1),
    ]
    assert policy.choose(candidates, max_waiting_per_instance=10) == Dispatch("c")


def test_least_loaded_ties_break_on_free_kv_then_id() -> None:
    policy = LeastLoaded()
    assert policy.choose(
        [candidate("a", running=1, kv_free=10), candidate("b", running=1, kv_free=50)],
        max_waiting_per_instance=10,
    ) == Dispatch("b")
    assert policy.choose(
        [candidate("z"), candidate("m"), candidate("q")], max_waiting_per_instance=10
    ) == Dispatch("m")


def test_least_loaded_skips_instances_that_are_not_ready() -> None:
    policy = LeastLoaded()
    decision = policy.choose(
        [candidate("idle", ready=False), candidate("busy", running=9)], max_waiting_per_instance=10
    )
    assert decision == Dispatch("busy")


def test_least_loaded_unavailable_without_ready_instances() -> None:
    policy = LeastLoaded(retry_after=2.5)
    for candidates in ([], [candidate("a", ready=False)]):
        decision = policy.choose(candidates, max_waiting_per_instance=10)
        assert isinstance(decision, Unavailable)
        assert decision.retry_after == 2.5


def test_least_loaded_overloaded_only_when_every_queue_is_full() -> None:
    policy = LeastLoaded()
    full = [candidate("a", waiting=3), candidate("b", waiting=1, outstanding=2)]
    decision = policy.choose(full, max_waiting_per_instance=3)
    assert isinstance(decision, Overloaded)
    assert decision.retry_after > 0
    # Running requests do not fill the queue; one open queue is enough, even if that instance is busier.
    open_one = [*full, candidate("c", running=50, waiting=2)]
    assert policy.choose(open_one, max_waiting_per_instance=3) == Dispatch("c")


def test_make_policy_names_the_known_ones() -> None:
    assert make_policy("least_loaded").name == "least_loaded"
    with pytest.raises(KeyError, match="least_loaded"):
        make_policy("round_robin")


# ---- registry ----


def test_registry_keeps_member_order_and_place_on_reregistration() -> None:
    registry = Registry(lease_seconds=3.0)
    for name in ("c", "a", "b"):
        registry.register(make_info(name), "m0", now=0.0)
    assert registry.register(make_info("a"), "m0", now=1.0)[1] == "known"
    assert registry.members("m0") == ["c", "a", "b"]
    registry.remove("a")
    assert registry.members("m0") == ["c", "b"]
    assert [r.instance_id for r in registry] == ["c", "b"]
    with pytest.raises(UnknownInstance, match="'a'"):
        registry.get("a")


def test_registry_treats_a_new_process_under_a_known_id_as_unloaded() -> None:
    registry = Registry(lease_seconds=3.0)
    registry.register(make_info("a"), "m0", now=0.0)
    registry.register(make_info("b"), "m0", now=0.0)
    registry.set_state("a", "draining")
    registry.heartbeat(make_status("a", running=4), now=0.5)
    registry.note_dispatch("a", "r1")
    reborn = dataclasses.replace(make_info("a"), pid=999)
    record, joined = registry.register(reborn, "m1", now=1.0)
    assert joined == "restarted"
    assert (record.status, record.pending, record.state, record.macro_instance_id) == (
        None,
        {},
        "draining",
        "m0",
    )
    assert registry.members("m0") == ["a", "b"]


def test_registry_expires_silent_instances_after_the_lease() -> None:
    registry = Registry(lease_seconds=3.0)
    registry.register(make_info("quiet"), "m0", now=0.0)
    registry.register(make_info("chatty"), "m0", now=0.0)
    assert registry.heartbeat(make_status("chatty"), now=2.5) is not None
    assert registry.expire(now=3.0) == []  # exactly the lease: not yet
    assert [r.instance_id for r in registry.expire(now=3.1)] == ["quiet"]
    assert "quiet" not in registry and "chatty" in registry
    assert registry.expire(now=5.4) == []
    registry.lease_seconds = 1.0  # a configuration change applies at once
    assert [r.instance_id for r in registry.expire(now=5.6)] == ["chatty"]
    assert registry.macro_instances() == []
    assert registry.heartbeat(make_status("quiet"), now=6.0) is None  # unknown now


def test_registry_counts_dispatches_until_a_report_shows_them() -> None:
    registry = Registry(lease_seconds=3.0)
    registry.register(make_info("a"), "m0", now=0.0)
    registry.note_dispatch("a", "r1")
    registry.note_dispatch("a", "r2")
    registry.note_dispatch("a", "r3")
    registry.cancel_dispatch("a", "r3")  # the instance refused it
    assert registry.candidates("m0")[0].outstanding == 2
    # A report listing r1 (now counted in num_waiting) while r2 is still in transit.
    registry.heartbeat(make_status("a", waiting=1, request_ids=("r1",)), now=0.1)
    (view,) = registry.candidates("m0")
    assert (view.num_waiting, view.outstanding, view.load) == (1, 1, 2)
    # r2 finished between reports and is never listed: it stops counting after PENDING_REPORTS reports
    # (the one above included).
    for n in range(PENDING_REPORTS - 1):
        assert registry.candidates("m0")[0].outstanding == 1
        registry.heartbeat(make_status("a", seq=n + 2), now=0.2 + n)
    assert registry.candidates("m0")[0].outstanding == 0


def test_registry_dispatchable_follows_admin_state_reports_and_confirmation() -> None:
    registry = Registry(lease_seconds=3.0)
    registry.register(make_info("a"), "m0", now=0.0)
    assert registry.candidates("m0")[0].ready  # registered, no report yet
    registry.set_state("a", "draining")
    assert not registry.candidates("m0")[0].ready
    registry.set_state("a", "ready")
    registry.heartbeat(make_status("a", state="stopping"), now=0.1)
    assert not registry.candidates("m0")[0].ready  # the instance itself says it is going away
    registry.restore(make_info("b"), "m0", "ready", now=0.2)
    assert not registry.get("b").dispatchable  # reloaded from Redis: not until it reports
    registry.heartbeat(make_status("b"), now=0.3)
    assert registry.get("b").dispatchable
    assert registry.members("m0") == ["a", "b"]


# ---- in-flight requests ----


def entry(request_id: str, instance_id: str = "a", at: float = 0.0) -> Inflight:
    return Inflight(request_id, instance_id, f"router.{request_id}", prompt_tokens=3, dispatched_at=at)


def test_inflight_forgets_requests_that_finished() -> None:
    tracker = InflightTracker(max_age=100.0)
    tracker.add(entry("listed"))
    tracker.add(entry("quick"))
    tracker.add(entry("other", instance_id="b"))
    tracker.observe(make_status("a", request_ids=("listed",)), 0.0)
    assert {e.request_id for e in tracker.of("a")} == {"listed", "quick"}
    tracker.observe(make_status("a"), 0.0)  # "listed" disappeared after being listed: finished
    assert {e.request_id for e in tracker.of("a")} == {"quick"}
    for _ in range(PENDING_REPORTS - 1):
        tracker.observe(make_status("a"), 0.0)
    assert tracker.of("a") == []  # never listed in PENDING_REPORTS reports: finished between reports
    assert [e.request_id for e in tracker.take_instance("b")] == ["other"]
    assert len(tracker) == 0


def test_inflight_keeps_progress_and_prunes_by_age() -> None:
    tracker = InflightTracker(max_age=10.0)
    tracker.add(entry("old", at=0.0))
    tracker.add(entry("new", at=8.0))
    tracker.observe(make_status("a", request_ids=("old", "new")), 0.0)
    assert {e.output_tokens for e in tracker.of("a")} == {1}
    assert tracker.prune(now=10.5) == 1
    assert [e.request_id for e in tracker.of("a")] == ["new"]


# ---- scheduling configuration ----


def test_scheduling_config_parses_text_and_typed_values() -> None:
    config = SchedulingConfig().updated({"max_waiting_per_instance": "8", "lease_seconds": 2})
    assert (config.max_waiting_per_instance, config.lease_seconds) == (8, 2.0)
    assert isinstance(config.lease_seconds, float)
    assert config.updated({"dispatch_policy": "least_loaded"}).dispatch_policy == "least_loaded"


@pytest.mark.parametrize(
    ("updates", "key"),
    [
        ({"no_such_key": 1}, "no_such_key"),
        ({"max_waiting_per_instance": "many"}, "max_waiting_per_instance"),
        ({"max_waiting_per_instance": 0}, "max_waiting_per_instance"),
        ({"max_waiting_per_instance": True}, "max_waiting_per_instance"),
        ({"lease_seconds": "nan"}, "lease_seconds"),
        ({"lease_seconds": -1}, "lease_seconds"),
        ({"dispatch_policy": "random"}, "dispatch_policy"),
        ({"lease_seconds": 1.0, "dispatch_timeout": 0}, "dispatch_timeout"),
    ],
)
def test_scheduling_config_rejects_naming_the_key(updates: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SchedulingConfig().updated(updates)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_scheduling_config_from_redis_skips_bad_entries() -> None:
    stored = {b"lease_seconds": b"1.5", b"max_waiting_per_instance": b"lots", b"retired_key": b"1"}
    config, problems = SchedulingConfig().with_stored(stored)
    assert config.lease_seconds == 1.5
    assert config.max_waiting_per_instance == SchedulingConfig().max_waiting_per_instance
    assert len(problems) == 2
    assert config.with_stored({k.encode(): v.encode() for k, v in config.to_text().items()})[0] == config
