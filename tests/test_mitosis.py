"""Mitosis scaling (services/coordinator/mitosis.py), its signals (scaling_signals.py) and the overall
scheduler's macro-instance choice (overall_scheduler.py). Pure: time is injected.

Unless a test says otherwise: N_l = 3, N_u = 6 (the paper's Figure 7), TTFT SLO 1 s.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.coordinator.mitosis import (
    Action,
    AddInstance,
    Merge,
    Mitosis,
    MitosisConfig,
    RemoveInstance,
    Split,
)
from services.coordinator.overall_scheduler import (
    MacroLoad,
    MostTtftBudget,
    SizeWeightedRoundRobin,
    make_choice,
)
from services.coordinator.scaling_signals import SampleWindow, Sustained

SLO = 1.0
# Signals as slow as production would set them (scaled down): 5 s hold, 20 s cool-down, 10 s window.
PATIENT = MitosisConfig(
    n_lower=3, n_upper=6, ttft_slo=SLO, window=10.0, min_samples=3, hold=5.0, cooldown=20.0
)
# Acts on every tick that has one sample of evidence: for testing placement alone.
EAGER = MitosisConfig(n_lower=3, n_upper=6, ttft_slo=SLO, window=1.0, min_samples=1, hold=0.0, cooldown=0.0)


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def sizes(mitosis: Mitosis) -> dict[str, int]:
    return {macro: len(members) for macro, members in mitosis.macros.items()}


def expand_once(mitosis: Mitosis, at: float) -> list[Action]:
    mitosis.observe_ttft(5 * SLO, at)
    return mitosis.tick(at)


def contract_once(mitosis: Mitosis, macro: str, at: float) -> list[Action]:
    mitosis.observe_activation(macro, None, at)  # nothing was decoding: all the slack there is
    return mitosis.tick(at)


# ---- signals with hysteresis and cool-down ----


def test_expansion_waits_for_a_sustained_ttft_miss_then_cools_down() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 3)}, spares=names("s", 3))
    acted_at = []
    for t in range(60):
        mitosis.observe_ttft(1.5 * SLO, float(t))
        if mitosis.tick(float(t)):
            acted_at.append(t)
    # First: 3 samples (t=2) then 5 s of holding (t=7). Then 20 s of cool-down, during which fresh evidence
    # accumulates (3 new samples by t=10) and holds, so the next one comes as soon as it ends, at t=27.
    assert acted_at == [7, 27, 47]
    assert sizes(mitosis) == {"m0": 6} and mitosis.spares == []


def test_evidence_from_before_an_action_does_not_count_after_it() -> None:
    # A window longer than the cool-down: without a fresh start, the misses that caused the first
    # expansion would still outweigh the good TTFTs that followed it and cause a second one.
    config = MitosisConfig(n_lower=3, n_upper=6, ttft_slo=SLO, window=60, min_samples=3, hold=5, cooldown=20)
    mitosis = Mitosis(config, {"m0": names("a", 3)}, spares=names("s", 2))
    acted_at = []
    for t in range(60):
        mitosis.observe_ttft(3 * SLO if not acted_at else 0.9 * SLO, float(t))
        if mitosis.tick(float(t)):
            acted_at.append(t)
    assert acted_at == [7]
    assert mitosis.signals(59.0).mean_ttft == pytest.approx(0.9 * SLO)


def test_a_signal_hovering_around_the_threshold_never_acts() -> None:
    config = MitosisConfig(
        n_lower=3, n_upper=6, ttft_slo=SLO, window=2.0, min_samples=1, hold=5.0, cooldown=0
    )
    mitosis = Mitosis(config, {"m0": names("a", 4)}, spares=names("s", 3))
    for t in range(200):
        above = (t // 4) % 2 == 0  # 4 s over the SLO, 4 s under, …: never 5 s in a row
        mitosis.observe_ttft(SLO * (1.3 if above else 0.7), float(t))
        mitosis.observe_activation("m0", 2.0 * SLO if not above else 0.5 * SLO, float(t))
        assert mitosis.tick(float(t)) == [], t
    assert sizes(mitosis) == {"m0": 4}


def test_contraction_on_sustained_saved_tpot_above_its_bound() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 6), "m1": names("b", 4)})
    bound_m1 = SLO * 5 / 4  # TTFT SLO·(n+1)/n with n = 4
    acted: list[tuple[int, list[Action]]] = []
    for t in range(30):
        mitosis.observe_activation("m1", 1.1 * bound_m1, float(t))
        if actions := mitosis.tick(float(t)):
            acted.append((t, actions))
    assert acted[0] == (7, [RemoveInstance("b3", "m1", acted[0][1][0].reason)])  # type: ignore[union-attr]
    assert "saved TPOT" in acted[0][1][0].reason  # type: ignore[union-attr]
    assert [t for t, _ in acted] == [7, 27]  # m0 (6 > N_l) is next: m1 is at N_l now
    assert acted[1][1][0] == RemoveInstance("a5", "m0", acted[1][1][0].reason)  # type: ignore[union-attr]


def test_slack_below_its_bound_or_ttft_misses_block_contraction() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 4)})
    for t in range(30):  # 4 members: bound 1.25 s; 1.2 s of saved TPOT is in the reasonable range
        mitosis.observe_activation("m0", 1.2 * SLO, float(t))
        assert mitosis.tick(float(t)) == []
    mitosis = Mitosis(PATIENT, {"m0": names("a", 4)})
    for t in range(30):  # plenty of slack, yet TTFT misses the SLO: never shrink (and no spare to grow)
        mitosis.observe_activation("m0", None, float(t))
        mitosis.observe_ttft(2 * SLO, float(t))
        assert mitosis.tick(float(t)) == []
    signals = mitosis.signals(29.0)
    assert signals.overloaded and not signals.over_provisioned and signals.slack_ratio == math.inf


def test_no_evidence_means_no_action() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 5)}, spares=["s0"])
    for t in range(0, 100, 5):
        assert mitosis.tick(float(t)) == []
    mitosis.observe_ttft(9.0, 100.0)  # one sample, fewer than min_samples
    assert mitosis.signals(100.0).mean_ttft is None


# ---- placement: split, refill, removal order, merge ----


def test_split_at_n_upper_into_n_lower_and_the_rest_then_refill_the_original_first() -> None:
    mitosis = Mitosis(EAGER, {"m0": names("a", 6)}, spares=names("s", 6))
    actions = expand_once(mitosis, 0.0)
    assert actions[0] == AddInstance("s0", "m0", False, actions[0].reason)  # type: ignore[union-attr]
    assert actions[1:] == [Split("m0", "m1", ("a4", "a5", "s0"))]
    assert mitosis.macros == {"m0": names("a", 4), "m1": ["a4", "a5", "s0"]}
    targets = [expand_once(mitosis, float(t))[0].macro_id for t in range(1, 6)]  # type: ignore[union-attr]
    assert targets == ["m0", "m0", "m1", "m1", "m1"]  # the original back to N_u before the new one grows
    assert sizes(mitosis) == {"m0": 6, "m1": 6}
    assert expand_once(mitosis, 6.0) == []  # no spare left


def test_split_as_in_the_paper_figure_13() -> None:
    config = MitosisConfig(n_lower=6, n_upper=11, ttft_slo=SLO, window=1, min_samples=1, hold=0, cooldown=0)
    mitosis = Mitosis(config, {"m0": names("i", 11)}, spares=["i11"])
    actions = expand_once(mitosis, 0.0)
    assert isinstance(actions[1], Split)
    assert sizes(mitosis) == {"m0": 6, "m1": 6}


def test_contraction_removes_from_the_smallest_above_n_lower_then_merges_when_they_fit() -> None:
    mitosis = Mitosis(EAGER, {"m0": names("a", 6), "m1": names("b", 5), "m2": names("c", 4)})
    steps = [contract_once(mitosis, "m0", float(t)) for t in range(4)]
    removed = [(a.macro_id, a.instance_id) for step in steps for a in step if isinstance(a, RemoveInstance)]
    assert removed == [("m2", "c3"), ("m1", "b4"), ("m1", "b3"), ("m1", "c2")]
    # After the third removal m1 and m2 hold 3 each, 6 together: they merge, the newer into the older.
    assert steps[2][1:] == [Merge("m2", "m1", ("c0", "c1", "c2"))]
    # Then both are full; the newer one shrinks first.
    assert mitosis.macros == {"m0": names("a", 6), "m1": ["b0", "b1", "b2", "c0", "c1"]}
    assert mitosis.draining == ["c3", "b4", "b3", "c2"]


def test_contraction_at_n_lower_removes_and_merges_at_once_and_stops_at_one_macro_instance() -> None:
    config = MitosisConfig(n_lower=3, n_upper=5, ttft_slo=SLO, window=1, min_samples=1, hold=0, cooldown=0)
    mitosis = Mitosis(config, {"m0": names("a", 3), "m1": names("b", 3)})
    actions = contract_once(mitosis, "m0", 0.0)
    assert actions[1:] == [Merge("m1", "m0", ("b0", "b1"))]
    assert isinstance(actions[0], RemoveInstance) and actions[0].instance_id == "b2"
    assert mitosis.macros == {"m0": ["a0", "a1", "a2", "b0", "b1"]}
    removals = [contract_once(mitosis, "m0", float(t)) for t in range(1, 5)]
    assert [len(step) for step in removals] == [1, 1, 0, 0]  # 5 → 4 → 3 = N_l, then the floor
    assert sizes(mitosis) == {"m0": 3}


# ---- the spare pool and repairs ----


def test_spares_form_the_first_macro_instance_up_to_n_lower() -> None:
    mitosis = Mitosis(PATIENT, spares=names("s", 5))
    actions = mitosis.tick(0.0)
    assert [(a.instance_id, a.macro_id, a.new_macro) for a in actions] == [  # type: ignore[union-attr]
        ("s0", "m0", True),
        ("s1", "m0", False),
        ("s2", "m0", False),
    ]
    assert mitosis.spares == ["s3", "s4"]
    assert mitosis.tick(1.0) == []


def test_removed_instances_drain_before_they_are_spares_again() -> None:
    mitosis = Mitosis(EAGER, {"m0": names("a", 4)})
    (removal,) = contract_once(mitosis, "m0", 0.0)
    assert removal == RemoveInstance("a3", "m0", removal.reason)  # type: ignore[union-attr]
    assert mitosis.spares == [] and mitosis.draining == ["a3"]
    assert expand_once(mitosis, 1.0) == []  # still finishing its requests: not available
    mitosis.drained("a3")
    assert mitosis.spares == ["a3"]
    assert expand_once(mitosis, 2.0)[0] == AddInstance("a3", "m0", False, "mean TTFT 5.000s > SLO 1.0s")
    with pytest.raises(ValueError, match="not draining"):
        mitosis.drained("a3")
    with pytest.raises(ValueError, match="already known"):
        mitosis.add_spare("a0")


def test_lost_instances_are_replaced_from_the_pool_or_their_macro_instance_merges() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 6), "m1": names("b", 3)}, spares=["s0"])
    assert mitosis.lose("b0") and not mitosis.lose("nobody")
    actions = mitosis.tick(0.0)
    assert [(a.instance_id, a.macro_id) for a in actions] == [("s0", "m1")]  # type: ignore[union-attr]
    assert mitosis.lose("a0") and mitosis.lose("a1") and mitosis.lose("b1")  # m0: 4, m1: 2, no spare
    assert mitosis.tick(1.0) == [Merge("m1", "m0", ("b2", "s0"))]
    assert sizes(mitosis) == {"m0": 6}


def test_new_macro_ids_are_never_reused() -> None:
    mitosis = Mitosis(EAGER, {"m4": names("a", 6)}, spares=names("s", 1))
    assert expand_once(mitosis, 0.0)[1] == Split("m4", "m5", ("a4", "a5", "s0"))


def test_config_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="2·n_lower"):
        MitosisConfig(n_lower=4, n_upper=6, ttft_slo=SLO)
    with pytest.raises(ValueError, match="n_lower"):
        MitosisConfig(n_lower=0, n_upper=6, ttft_slo=SLO)
    with pytest.raises(ValueError, match="cooldown"):
        MitosisConfig(n_lower=3, n_upper=6, ttft_slo=SLO, cooldown=-1)


# ---- by hand: assign, release, reconfigure, restore ----


def test_assign_places_like_an_expansion_or_where_asked_and_splits_past_n_upper() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 5), "m1": names("b", 3)}, spares=names("s", 3))
    assert mitosis.assign("s1", None, "by hand") == [AddInstance("s1", "m0", False, "by hand")]
    actions = mitosis.assign("s0", "m0", "by hand")
    assert actions == [AddInstance("s0", "m0", False, "by hand"), Split("m0", "m2", ("a4", "s1", "s0"))]
    assert mitosis.spares == ["s2"]
    with pytest.raises(ValueError, match="already in m1"):
        mitosis.assign("b0", None, "by hand")
    with pytest.raises(ValueError, match="no macro instance 'm7'"):
        mitosis.assign("s2", "m7", "by hand")
    assert mitosis.spares == ["s2"]  # a refused assignment changes nothing


def test_release_drains_a_member_and_merges_what_then_fits() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 5), "m1": names("b", 3)})
    assert mitosis.release("a0", "by hand") == [RemoveInstance("a0", "m0", "by hand")]  # 4 + 3 > N_u
    actions = mitosis.release("b2", "by hand")
    assert actions == [RemoveInstance("b2", "m1", "by hand"), Merge("m1", "m0", ("b0", "b1"))]
    assert mitosis.macros == {"m0": ["a1", "a2", "a3", "a4", "b0", "b1"]} and mitosis.draining == ["a0", "b2"]
    # Taking a draining instance back cancels its removal.
    assert mitosis.assign("a0", "m0", "back")[0] == AddInstance("a0", "m0", False, "back")  # (m0 then splits)
    assert mitosis.draining == ["b2"]
    lone = Mitosis(PATIENT, {"m0": ["a"]})
    with pytest.raises(ValueError, match="last one serving"):
        lone.release("a", "by hand")
    with pytest.raises(ValueError, match="not a member"):
        lone.release("zz", "by hand")


def test_a_release_that_empties_a_macro_instance_removes_it() -> None:
    config = MitosisConfig(n_lower=1, n_upper=3, ttft_slo=SLO)
    mitosis = Mitosis(config, {"m0": ["a", "b", "c"], "m1": ["d"]})
    assert mitosis.release("d", "by hand") == [RemoveInstance("d", "m1", "by hand")]
    assert mitosis.macros == {"m0": ["a", "b", "c"]}


def test_reconfigure_keeps_evidence_unless_the_slo_changes() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 3)}, spares=["s0"])
    for t in range(4):
        mitosis.observe_ttft(1.5 * SLO, float(t))
        assert mitosis.tick(float(t)) == []  # held since t=2, for 5 s
    # A shorter hold applies to the wait already under way.
    mitosis.reconfigure(dataclasses.replace(PATIENT, hold=1.0), 4.0)
    mitosis.observe_ttft(1.5 * SLO, 4.0)
    assert [type(a) for a in mitosis.tick(4.0)] == [AddInstance]
    # A new SLO restarts the evidence: the old samples were judged against the old one.
    mitosis = Mitosis(PATIENT, {"m0": names("a", 3)}, spares=["s0"])
    for t in range(3):
        mitosis.observe_ttft(1.5 * SLO, float(t))
    mitosis.reconfigure(dataclasses.replace(PATIENT, ttft_slo=1.2 * SLO), 3.0)
    assert mitosis.signals(3.0).mean_ttft is None
    with pytest.raises(ValueError, match="prefix"):
        mitosis.reconfigure(dataclasses.replace(PATIENT, macro_prefix="x"), 3.0)


def test_draining_instances_can_be_restored_and_finish_into_the_pool() -> None:
    mitosis = Mitosis(PATIENT, {"m0": names("a", 3)}, spares=["s0"], draining=["d0"])
    assert mitosis.draining == ["d0"] and mitosis.spares == ["s0"]
    mitosis.drained("d0")
    assert mitosis.spares == ["s0", "d0"]
    with pytest.raises(ValueError, match="already known"):
        Mitosis(PATIENT, {"m0": ["a"]}, draining=["a"])


def test_repair_alone_ignores_the_signals() -> None:
    mitosis = Mitosis(EAGER, {"m0": names("a", 2)}, spares=names("s", 3))
    mitosis.observe_ttft(9.0, 0.0)
    assert [(a.instance_id, a.macro_id) for a in mitosis.repair()] == [("s0", "m0")]  # type: ignore[union-attr]
    assert mitosis.repair() == [] and mitosis.spares == ["s1", "s2"]


# ---- signal building blocks ----


def test_sample_window_slides_and_restarts() -> None:
    window = SampleWindow(span=10.0)
    for t in (0.0, 5.0, 9.0):
        window.add(t, t)
    assert window.values(10.0) == [0.0, 5.0, 9.0]
    assert window.values(12.0) == [5.0, 9.0]
    assert window.mean(12.0, min_samples=3) is None and window.mean(12.0, min_samples=2) == 7.0
    window.restart(12.0)
    window.add(13.0, 1.0)
    assert window.values(13.0) == [1.0]


def test_sustained_needs_an_unbroken_hold() -> None:
    trigger = Sustained(hold=3.0)
    assert [trigger.update(True, t) for t in (0.0, 1.0, 2.0, 3.0)] == [False, False, False, True]
    assert not trigger.update(False, 4.0)
    assert not trigger.update(True, 5.0)  # the wait starts again


# ---- the overall scheduler's macro-instance choice ----


def test_size_weighted_round_robin_follows_sizes_and_interleaves() -> None:
    choice = SizeWeightedRoundRobin()
    loads = [MacroLoad("big", 6), MacroLoad("small", 3), MacroLoad("empty", 0)]
    picks = "".join(choice.choose(loads)[0] for _ in range(9))  # type: ignore[index]
    assert picks == "bsbbsbbsb"
    # A macro instance that splits off joins in with its own weight; one that vanished is forgotten.
    loads = [MacroLoad("big", 3), MacroLoad("new", 3)]
    picks = "".join(choice.choose(loads)[0] for _ in range(6))  # type: ignore[index]
    assert sorted(picks) == sorted("bbbnnn")
    assert choice.choose([MacroLoad("empty", 0)]) is None


def test_most_ttft_budget_prefers_room_then_size() -> None:
    choice = MostTtftBudget()
    loads = [MacroLoad("a", 6, 0.2), MacroLoad("b", 3, 0.7), MacroLoad("c", 9, None)]
    assert choice.choose(loads) == "b"
    assert choice.choose([MacroLoad("a", 6, 0.5), MacroLoad("b", 3, 0.5)]) == "a"
    assert choice.choose([MacroLoad("c", 9, None), MacroLoad("d", 1, -0.3)]) == "d"
    assert make_choice("size_weighted").name == "size_weighted"
    with pytest.raises(KeyError, match="most_ttft_budget"):
        make_choice("random")
