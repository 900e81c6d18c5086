"""Where `ecoserve up` puts its processes: engines on cores of their own, the control plane on the rest."""

from __future__ import annotations

import argparse
import os

import pytest

from services.core_plan import CorePlan, pin_mode, plan_cores


def test_auto_gives_each_instance_its_own_cores_and_the_control_plane_the_rest():
    plan = plan_cores(range(8), instances=3, threads=2, mode="auto")
    assert plan.instances == (frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}))
    assert plan.control == frozenset({6, 7})


def test_auto_uses_the_cores_this_process_may_use_not_their_numbers():
    plan = plan_cores({3, 5, 9}, instances=1, threads=1, mode="auto")
    assert plan == CorePlan(instances=(frozenset({3}),), control=frozenset({5, 9}))


def test_auto_leaves_everything_to_the_os_when_cores_are_too_few():
    assert plan_cores(range(2), instances=2, threads=2, mode="auto") == CorePlan((None, None), None)


def test_every_core_taken_by_instances_leaves_the_control_plane_unpinned():
    plan = plan_cores(range(2), instances=1, threads=2, mode="auto")
    assert plan.instances == (frozenset({0, 1}),) and plan.control is None


def test_on_shares_cores_round_robin_and_off_pins_nothing():
    plan = plan_cores(range(2), instances=3, threads=1, mode="on")
    assert plan.instances == (frozenset({0}), frozenset({1}), frozenset({0})) and plan.control is None
    assert plan_cores(range(8), instances=1, threads=1, mode="off") == CorePlan((None,), None)


@pytest.mark.parametrize(("value", "mode"), [("AUTO", "auto"), ("1", "on"), ("true", "on"), (" 0 ", "off")])
def test_pin_mode_accepts_the_old_boolean_spellings(value, mode):
    assert pin_mode(value) == mode


def test_bad_modes_and_shapes_are_refused():
    with pytest.raises(ValueError, match="pin mode"):
        pin_mode("sometimes")
    with pytest.raises(ValueError, match="pin mode"):
        plan_cores(range(2), 1, 1, "always")
    with pytest.raises(ValueError, match="at least one"):
        plan_cores(range(2), 0, 1, "auto")


def _up_args(*flags: str) -> argparse.Namespace:
    from services.launcher import add_up_args

    parser = argparse.ArgumentParser()
    add_up_args(parser)
    return parser.parse_args(list(flags))


def test_the_launcher_pins_instances_and_the_control_plane_apart():
    from services.launcher import plan_children

    args = _up_args("--instances", "1", "--threads-per-instance", "1", "--pin-cores")
    coordinator, instance, router = plan_children(args, "nats://n", "redis://r", "/models/m")
    available = os.sched_getaffinity(0)
    assert instance.cpus is not None and len(instance.cpus) == 1 and instance.cpus <= available
    rest = frozenset(available) - instance.cpus
    assert coordinator.cpus == router.cpus == (rest or None)
    off = plan_children(_up_args("--no-pin-cores"), "nats://n", "redis://r", "/models/m")
    assert all(child.cpus is None for child in off)


def test_a_bad_pin_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _up_args("--pin-cores", "sometimes")
    assert "pin" in capsys.readouterr().err


def test_embedded_servers_start_on_the_cores_they_are_given():
    from services.infra.embedded import start_nats, start_redis

    core = min(os.sched_getaffinity(0))
    with start_nats(cpus={core}) as nats_server, start_redis(cpus={core}) as redis_server:
        assert os.sched_getaffinity(nats_server.process.pid) == {core}
        assert os.sched_getaffinity(redis_server.process.pid) == {core}
