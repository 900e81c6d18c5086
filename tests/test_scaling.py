"""The scaling controller (services/coordinator/scaling.py): mitosis plans carried out through ClusterOps.

Pure logic with injected time: `RecordingOps` stands in for the leader, keeping its own membership table the
way the registry does, so every test can check that what was carried out matches what was planned.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from redis.exceptions import RedisError

from services.coordinator.mitosis import MitosisConfig
from services.coordinator.padg import Activation
from services.coordinator.padg_views import StatusDelta
from services.coordinator.scaling import SPARE_POOL, Layout, ScalingController, ScalingError
from services.coordinator.scaling_log import ScalingEvent
from services.coordinator.scaling_settings import ScalingSettings, SettingsError

SLO = 1.0
# Acts on the first sample: for testing what is carried out, not when.
EAGER = dict(window=1.0, min_samples=1, hold=0.0, cooldown=0.0)
ON = ScalingSettings(enabled=True, **EAGER)  # type: ignore[arg-type]
OFF = ScalingSettings(enabled=False, **EAGER)  # type: ignore[arg-type]


class RecordingOps:
    """ClusterOps as the leader would carry them out, on an in-memory membership table."""

    def __init__(
        self,
        macros: dict[str, list[str]] | None = None,
        spares: Sequence[str] = (),
        draining: Sequence[str] = (),
    ):
        self.macros = {m: list(members) for m, members in (macros or {}).items()}
        self.pool = {i: "ready" for i in spares} | {i: "draining" for i in draining}
        self.busy: set[str] = set()
        self.calls: list[tuple[object, ...]] = []
        self.fail: str | None = None  # the next call to this operation raises

    def layout(self) -> Layout:
        return Layout(
            macros={m: list(members) for m, members in self.macros.items()},
            spares=[i for i, state in self.pool.items() if state == "ready"],
            draining=[i for i, state in self.pool.items() if state == "draining"],
        )

    def holds_work(self, instance_id: str) -> bool:
        return instance_id in self.busy

    def _check(self, operation: str) -> None:
        if self.fail == operation:
            self.fail = None
            raise ConnectionError(f"{operation} failed")

    def take(self, instance_id: str) -> None:
        """Out of wherever it is; an emptied macro instance's member list goes (as in the registry)."""
        self.pool.pop(instance_id, None)
        for macro, members in list(self.macros.items()):
            if instance_id in members:
                members.remove(instance_id)
                if not members:
                    del self.macros[macro]

    async def move(self, macro_id: str, instance_ids: Sequence[str]) -> None:
        self.calls.append(("move", macro_id, tuple(instance_ids)))
        self._check("move")
        for instance_id in instance_ids:
            self.take(instance_id)
            self.macros.setdefault(macro_id, []).append(instance_id)

    async def drain(self, instance_id: str) -> None:
        self.calls.append(("drain", instance_id))
        self._check("drain")
        self.take(instance_id)
        self.pool[instance_id] = "draining"

    async def spare(self, instance_id: str) -> None:
        self.calls.append(("spare", instance_id))
        self._check("spare")
        assert self.pool[instance_id] == "draining"
        self.pool[instance_id] = "ready"

    async def retire_macro(self, macro_id: str) -> None:
        self.calls.append(("retire", macro_id))
        assert macro_id not in self.macros, f"{macro_id} still has members"

    async def changed(self, reason: str) -> None:
        self.calls.append(("changed",))

    def register(self, controller: ScalingController, instance_id: str) -> str:
        """What the leader does with a new instance."""
        macro = controller.admit(instance_id)
        if macro == SPARE_POOL:
            self.pool[instance_id] = "ready"
        else:
            self.macros.setdefault(macro, []).append(instance_id)
        return macro

    def operations(self) -> list[tuple[object, ...]]:
        """The calls that change membership, then forget them."""
        calls = [c for c in self.calls if c[0] != "changed"]
        self.calls.clear()
        return calls


class MemoryEvents:
    def __init__(self) -> None:
        self.events: list[ScalingEvent] = []

    async def append(self, events: Sequence[ScalingEvent]) -> list[str]:
        self.events += events
        return [str(len(self.events) - i) for i in range(len(events))]

    async def recent(self, count: int) -> list[ScalingEvent]:
        return self.events[-count:]

    def take(self) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
        taken = [(e.action, e.cause, e.macros, e.instances) for e in self.events]
        self.events.clear()
        return taken


def controller_for(
    ops: RecordingOps, settings: ScalingSettings, n_lower: int, n_upper: int
) -> tuple[ScalingController, MemoryEvents]:
    events = MemoryEvents()
    config = settings.mitosis_config(n_lower=n_lower, n_upper=n_upper, ttft_slo=SLO)
    controller = ScalingController(ops, config, settings, events=events, clock=lambda: 1e9)
    return controller, events


def assert_in_step(ops: RecordingOps, controller: ScalingController) -> None:
    """What the leader holds is what the planner thinks."""
    layout = ops.layout()
    assert (layout.macros, layout.spares, layout.draining) == (
        controller.macros,
        controller.spares,
        controller.draining,
    )


# ---- joining ----


async def test_with_autoscaling_off_instances_join_at_once_and_split_past_n_upper() -> None:
    ops = RecordingOps()
    controller, events = controller_for(ops, OFF, n_lower=2, n_upper=3)
    assert [ops.register(controller, i) for i in "abcd"] == ["m0", "m0", "m0", "m0"]
    assert ops.operations() == []  # the leader registered them there itself
    await controller.tick(0.0)
    # The fourth exceeded N_u = 3: its last N_l = 2 form m1.
    assert ops.operations() == [("move", "m1", ("c", "d"))]
    assert ops.macros == {"m0": ["a", "b"], "m1": ["c", "d"]}
    assert events.take() == [
        ("add", "join", ("m0",), ("a",)),
        ("add", "join", ("m0",), ("b",)),
        ("add", "join", ("m0",), ("c",)),
        ("add", "join", ("m0",), ("d",)),
        ("split", "join", ("m0", "m1"), ("c", "d")),
    ]
    assert ops.register(controller, "e") == "m0"  # the older of two equally full
    await controller.tick(1.0)
    assert ops.operations() == [] and controller.spares == []
    assert_in_step(ops, controller)


async def test_with_autoscaling_on_new_instances_wait_until_the_ttft_signal_calls_them() -> None:
    settings = ScalingSettings(enabled=True, window=10.0, min_samples=2, hold=2.0, cooldown=5.0)
    ops = RecordingOps()
    controller, events = controller_for(ops, settings, n_lower=1, n_upper=3)
    assert [ops.register(controller, i) for i in "abc"] == [SPARE_POOL] * 3
    await controller.tick(0.0)
    assert ops.operations() == [("move", "m0", ("a",))]  # repair: the first macro instance, up to N_l
    assert events.take() == [("add", "repair", ("m0",), ("a",))]
    acted = []
    for t in range(1, 12):
        controller.observe_ttft(3 * SLO, float(t))
        if await controller.tick(float(t)):
            acted.append(t)
    # Two samples by t=2, held for 2 s: t=4; then 5 s of cool-down with fresh evidence: t=9.
    assert acted == [4, 9]
    assert ops.operations() == [("move", "m0", ("b",)), ("move", "m0", ("c",))]
    first = events.events[0]
    assert (first.action, first.cause, first.mean_ttft) == ("add", "expand", 3 * SLO)
    assert "mean TTFT 3.000s" in first.reason and first.time == 1e9
    assert_in_step(ops, controller)


# ---- contraction: drain, then back to the pool; merges ----


async def test_a_removed_instance_drains_before_it_is_a_spare_again() -> None:
    ops = RecordingOps({"m0": ["a", "b", "c"]})
    controller, events = controller_for(ops, ON, n_lower=1, n_upper=3)
    ops.busy.add("c")
    controller.observe_activation("m0", None, 0.0)  # nothing decoding: over-provisioned
    await controller.tick(0.0)
    assert ops.operations() == [("drain", "c")]
    assert controller.draining == ["c"] and ops.pool == {"c": "draining"}
    await controller.tick(1.0)
    assert ops.operations() == []  # still holding requests
    ops.busy.clear()
    done = await controller.tick(2.0)
    assert ops.operations() == [("spare", "c")]
    assert [(e.action, e.cause, e.instances) for e in done] == [("spare", "drained", ("c",))]
    assert controller.spares == ["c"]
    assert [e[:2] for e in events.take()] == [("remove", "contract"), ("spare", "drained")]
    assert_in_step(ops, controller)


async def test_contraction_merges_macro_instances_that_fit_and_retires_the_source() -> None:
    ops = RecordingOps({"m0": ["a", "b", "c"], "m1": ["d", "e"]})
    controller, events = controller_for(ops, ON, n_lower=2, n_upper=4)
    controller.observe_activation("m0", None, 0.0)
    await controller.tick(0.0)
    assert ops.operations() == [("drain", "c"), ("move", "m0", ("d", "e")), ("retire", "m1")]
    assert ops.macros == {"m0": ["a", "b", "d", "e"]}
    assert events.take() == [
        ("remove", "contract", ("m0",), ("c",)),
        ("merge", "contract", ("m1", "m0"), ("d", "e")),
    ]
    assert_in_step(ops, controller)


async def test_draining_instances_restored_from_the_leader_finish_into_the_pool() -> None:
    ops = RecordingOps({"m0": ["a"]}, spares=["s"], draining=["x"])
    controller, _ = controller_for(ops, OFF, n_lower=1, n_upper=3)
    assert controller.spares == ["s"] and controller.draining == ["x"]
    await controller.tick(0.0)
    assert ops.operations() == [("spare", "x")]
    assert controller.spares == ["s", "x"]


# ---- instances that leave ----


async def test_a_lost_member_is_replaced_from_the_pool_and_an_emptied_macro_instance_retires() -> None:
    ops = RecordingOps({"m0": ["a", "b"], "m1": ["c", "d"]}, spares=["s"])
    controller, events = controller_for(ops, OFF, n_lower=2, n_upper=4)
    ops.take("c")
    await controller.lost("c", "no status report for more than 3s")
    await controller.tick(0.0)
    assert ops.operations() == [("move", "m1", ("s",))]
    assert events.take() == [("lost", "departed", ("m1",), ("c",)), ("add", "repair", ("m1",), ("s",))]
    for instance_id in ("d", "s"):
        ops.take(instance_id)
        await controller.lost(instance_id, "deregistered")
    await controller.tick(1.0)
    assert ops.operations() == [("retire", "m1")]
    assert controller.macros == {"m0": ["a", "b"]}
    await controller.lost("nobody", "deregistered")  # unknown: nothing to log
    assert [e[0] for e in events.take()] == ["lost", "lost"]
    assert_in_step(ops, controller)


# ---- operator commands ----


async def test_operators_add_spares_and_remove_members() -> None:
    ops = RecordingOps({"m0": ["a", "b"], "m1": ["c", "d"]}, spares=["s0", "s1", "s2"])
    controller, events = controller_for(ops, OFF, n_lower=2, n_upper=3)
    done = await controller.add_instance(0.0)  # the first spare, where an expansion would put it
    assert [(e.action, e.cause, e.macros, e.instances) for e in done] == [("add", "manual", ("m0",), ("s0",))]
    await controller.add_instance(0.0, "s2", "m1")
    assert ops.operations() == [("move", "m0", ("s0",)), ("move", "m1", ("s2",))]
    # A third member for a full one: N_u = 3 is exceeded and it splits, as an expansion would.
    done = await controller.add_instance(0.0, "s1", "m0")
    assert [e.action for e in done] == ["add", "split"]
    assert controller.macros == {"m0": ["a", "b"], "m1": ["c", "d", "s2"], "m2": ["s0", "s1"]}
    for args, problem in (
        ((), "no spare instance"),
        (("a",), "already in m0"),
        (("nobody",), "not a spare"),
        (("a", "m9"), "no macro instance 'm9'"),
    ):
        with pytest.raises(ScalingError, match=problem):
            await controller.add_instance(1.0, *args)
    ops.operations()
    await controller.remove_instance(1.0, "s2")
    assert ops.operations() == [("drain", "s2")]
    with pytest.raises(ScalingError, match="not a member"):
        await controller.remove_instance(1.0, "s2")
    # A draining instance can be taken back at once: it cancels the removal.
    await controller.add_instance(2.0, "s2", "m1")
    assert ops.operations() == [("move", "m1", ("s2",))] and controller.draining == []
    assert [e[:2] for e in events.take()][-2:] == [("remove", "manual"), ("add", "manual")]
    assert_in_step(ops, controller)


async def test_the_last_serving_instance_cannot_be_removed() -> None:
    ops = RecordingOps({"m0": ["a"]})
    controller, _ = controller_for(ops, OFF, n_lower=1, n_upper=3)
    with pytest.raises(ScalingError, match="last one serving"):
        await controller.remove_instance(0.0, "a")
    assert ops.operations() == []


async def test_an_operator_change_starts_a_cool_down_for_the_autoscaler() -> None:
    settings = ScalingSettings(enabled=True, window=5.0, min_samples=1, hold=0.0, cooldown=10.0)
    ops = RecordingOps({"m0": ["a", "b"]}, spares=["s0", "s1"])
    controller, _ = controller_for(ops, settings, n_lower=1, n_upper=4)
    await controller.add_instance(0.0)
    ops.operations()
    acted = []
    for t in range(1, 14):
        controller.observe_ttft(3 * SLO, float(t))
        if await controller.tick(float(t)):
            acted.append(t)
    assert acted == [10]


# ---- failures ----


async def test_a_failed_operation_drops_the_plan_and_rereads_membership() -> None:
    ops = RecordingOps({"m0": ["a", "b", "c"], "m1": ["d", "e"]})
    controller, events = controller_for(ops, ON, n_lower=2, n_upper=4)
    ops.fail = "move"  # the merge after the removal
    controller.observe_activation("m0", None, 0.0)
    done = await controller.tick(0.0)
    assert [e.action for e in done] == ["remove"]  # only what was carried out
    assert ops.operations() == [("drain", "c"), ("move", "m0", ("d", "e"))]
    assert_in_step(ops, controller)  # the planner follows the leader again: no merge happened
    assert controller.macros == {"m0": ["a", "b"], "m1": ["d", "e"]}
    assert [e[0] for e in events.take()] == ["remove"]


# ---- the overall scheduler ----


async def test_choose_macro_weighs_ready_members_and_never_picks_the_pool() -> None:
    ops = RecordingOps({"m0": ["a", "b", "c"], "m1": ["d", "e", "f"]}, spares=["s"])
    controller, _ = controller_for(ops, OFF, n_lower=1, n_upper=3)
    ready = {"m0": 2, "m1": 1, SPARE_POOL: 9}
    picks = [controller.choose_macro(ready) for _ in range(6)]
    assert picks.count("m0") == 4 and picks.count("m1") == 2
    assert controller.choose_macro({"m0": 0}) is None
    await controller.update_settings({"macro_choice": "most_ttft_budget"}, 0.0)
    assert controller.choose_macro({"m0": 3, "m1": 3}, {"m0": 0.1, "m1": 0.4}) == "m1"


# ---- settings ----


async def test_settings_are_validated_and_applied() -> None:
    ops = RecordingOps({"m0": ["a"]})
    controller, events = controller_for(ops, OFF, n_lower=1, n_upper=3)
    for bad, key in (({"bogus": 1}, "bogus"), ({"window": "0"}, "window"), ({"enabled": "maybe"}, "enabled")):
        with pytest.raises(SettingsError, match=key):
            await controller.update_settings(bad, 0.0)
    settings = await controller.update_settings({"enabled": "on", "window": "12.5"}, 0.0)
    assert settings.enabled and controller.config.window == 12.5
    assert ops.register(controller, "b") == SPARE_POOL  # autoscaling on: it waits
    assert events.take() == [("configure", "config", (), ())]
    with pytest.raises(ScalingError, match="n_upper"):
        controller.check_bounds(n_lower=3)  # 2·3 − 1 > 3
    await controller.set_bounds(1.0, n_lower=2, n_upper=4, ttft_slo=2.0)
    assert (controller.config.n_lower, controller.config.n_upper, controller.config.ttft_slo) == (2, 4, 2.0)
    view = controller.view(1.0)
    assert view["settings"]["n_upper"] == 4 and view["enabled"] is True and view["spares"] == ["b"]
    # N_l = 2 now: the repair takes the spare into m0.
    await controller.tick(2.0)
    assert controller.macros == {"m0": ["a", "b"]}


async def test_padg_hooks_feed_the_signals() -> None:
    clock = [100.0]
    ops = RecordingOps({"m0": ["a", "b"]})
    config = MitosisConfig(n_lower=1, n_upper=3, ttft_slo=SLO, window=10.0, min_samples=2)
    controller = ScalingController(ops, config, ON, monotonic=lambda: clock[0])
    controller.on_status_delta("m0", "a", StatusDelta(ttfts=(("r1", 2.0), ("r2", 4.0))))
    controller.on_activation("m0", Activation(activate="b", deactivate="a", saved_tpot=None), 7)
    controller.on_activation("m0", Activation(activate="a", deactivate="b", saved_tpot=0.75), 8)
    signals = controller.view(100.0)["signals"]
    assert signals["mean_ttft"] == 3.0 and signals["overloaded"]
    # Bound for n = 2: SLO·3/2 = 1.5; the ratios are inf and 0.5, whose median is inf.
    assert signals["slack_ratio"] == "inf"


async def test_a_failing_event_log_does_not_undo_or_block_a_change() -> None:
    class BrokenLog(MemoryEvents):
        async def append(self, events: Sequence[ScalingEvent]) -> list[str]:
            raise RedisError("connection refused")

    ops = RecordingOps({"m0": ["a"]}, spares=["s"])
    config = OFF.mitosis_config(n_lower=2, n_upper=3, ttft_slo=SLO)
    controller = ScalingController(ops, config, OFF, events=BrokenLog())
    done = await controller.tick(0.0)
    assert [e.action for e in done] == ["add"] and ops.macros == {"m0": ["a", "s"]}


def test_a_known_instance_keeps_its_place_when_admitted_again() -> None:
    ops = RecordingOps({"m0": ["a"]}, spares=["s"], draining=["d"])
    controller, _ = controller_for(ops, OFF, n_lower=1, n_upper=3)
    assert [controller.admit(i) for i in ("a", "s", "d")] == ["m0", SPARE_POOL, SPARE_POOL]
    assert controller.macros == {"m0": ["a"]} and controller.spares == ["s"]


async def test_admissions_are_logged_in_order_before_a_later_change() -> None:
    ops = RecordingOps()
    clock = iter(range(100))
    config = OFF.mitosis_config(n_lower=1, n_upper=3, ttft_slo=SLO)
    controller = ScalingController(
        ops, config, OFF, events=(events := MemoryEvents()), clock=lambda: next(clock)
    )
    for instance_id in "ab":
        ops.register(controller, instance_id)
    await controller.remove_instance(0.0, "b")  # before any tick carried the admissions out
    assert [(e.action, e.instances, e.time) for e in events.events] == [
        ("add", ("a",), 0),
        ("add", ("b",), 1),
        ("remove", ("b",), 2),
    ]
    assert ops.operations() == [("drain", "b")]
    assert_in_step(ops, controller)


async def test_paused_for_fudg_new_instances_serve_at_once_and_signals_wait():
    # With autoscaling on, a new instance would wait in the pool for a signal FuDG never produces.
    ops = RecordingOps()
    controller, _ = controller_for(ops, ON, n_lower=1, n_upper=4)
    controller.paused = True
    assert ops.register(controller, "a") != SPARE_POOL
    assert ops.register(controller, "b") != SPARE_POOL
    assert not ops.pool and sorted(i for ms in ops.macros.values() for i in ms) == ["a", "b"]
    controller.paused = False
    assert ops.register(controller, "c") == SPARE_POOL  # autoscaling again once FuDG is off
