"""The PaDG window bookkeeping (padg_windows.py) and the PaDG configuration keys. Pure: time is injected."""

from __future__ import annotations

import pytest

from services.coordinator.padg_windows import WindowBook, WindowOrder
from services.coordinator.scheduling_config import ConfigError, SchedulingConfig, scheduling_defaults
from shared.config import CoordinatorConfig
from shared.messages import InstanceStatus

NOW = 1000.0


def status(instance_id: str, window: bool | None, epoch: int) -> InstanceStatus:
    return InstanceStatus(
        instance_id=instance_id,
        seq=0,
        time=NOW,
        state="ready",
        phase="decode",
        num_running=0,
        num_waiting=0,
        kv_blocks_free=10,
        kv_blocks_total=10,
        num_preemptions=0,
        requests=[],
        prefill_window=window,
        window_epoch=epoch,
    )


def test_activation_bumps_the_epoch_opens_the_new_instance_and_closes_the_previous() -> None:
    book = WindowBook(epoch=4)
    assert book.activate("a", None, NOW) == [WindowOrder("a", True, 5)]
    assert book.activate("b", "a", NOW + 1) == [WindowOrder("b", True, 6), WindowOrder("a", False, 6)]
    assert book.activate("a", "b", NOW + 2) == [WindowOrder("a", True, 7), WindowOrder("b", False, 7)]
    assert (book.active, book.epoch, book.opened_at) == ("a", 7, NOW + 2)
    assert book.opened == {"a": 2, "b": 1}


def test_reports_that_disagree_get_the_order_again_but_not_more_than_once_per_interval() -> None:
    book = WindowBook(resend_interval=1.0)
    book.activate("a", None, NOW)
    book.activate("b", "a", NOW)  # epoch 2
    # Reports sent before the orders arrived: the orders went out just now, so nothing is repeated.
    assert book.correction(status("b", False, 1), NOW + 0.1) is None
    assert book.correction(status("a", True, 1), NOW + 0.1) is None
    # Still wrong a second later: the order was lost.
    assert book.correction(status("b", False, 1), NOW + 1.2) == WindowOrder("b", True, 2)
    assert book.correction(status("a", True, 1), NOW + 1.2) == WindowOrder("a", False, 2)
    # Applied: nothing to do. An open window at an older epoch is brought to the current one.
    assert book.correction(status("b", True, 2), NOW + 3) is None
    assert book.correction(status("a", False, 2), NOW + 3) is None
    assert book.correction(status("c", False, 0), NOW + 3) is None  # closed, and not the active one
    book.activate("c", "b", NOW + 4)  # epoch 3
    book.activate("b", "c", NOW + 4)  # epoch 4: b's window never closed
    assert book.correction(status("b", True, 2), NOW + 6) == WindowOrder("b", True, 4)
    # An instance without a window (another policy) is never steered.
    assert book.correction(status("b", None, 0), NOW + 9) is None


def test_a_takeover_resends_the_open_order_once_and_continues_above_reported_epochs() -> None:
    book = WindowBook(epoch=9, opened_at=NOW)
    book.restored("a")
    # The active instance reports its window open at that epoch: re-sent anyway, once (idempotent).
    assert book.correction(status("a", True, 9), NOW) == WindowOrder("a", True, 9)
    assert book.correction(status("a", True, 9), NOW + 5) is None
    # Another member still has its window open (a close got lost with the old coordinator): closed.
    assert book.correction(status("b", True, 8), NOW) == WindowOrder("b", False, 9)
    # An instance applied a higher epoch than Redis held: the next activation goes above it.
    assert not book.adopt(status("c", False, 9))
    assert book.adopt(status("c", False, 11)) and book.epoch == 11
    assert book.activate("c", "a", NOW)[0] == WindowOrder("c", True, 12)


def test_padg_configuration_keys_parse_validate_and_round_trip_through_text() -> None:
    config = SchedulingConfig().updated(
        {
            "dispatch_policy": "padg",
            "ttft_slo": "0.5",
            "tpot_slo": 0.05,
            "padg_variant": "authors",
            "prefill_rule": b"authors",
            "hold_outputs": "on",
            "pending_timeout": 0,
            "n_lower": "4",
            "n_upper": 7,
        }
    )
    assert (config.dispatch_policy, config.ttft_slo, config.hold_outputs, config.n_lower) == (
        "padg",
        0.5,
        True,
        4,
    )
    text = config.to_text()
    assert text["hold_outputs"] == "true"
    stored = {k.encode(): v.encode() for k, v in text.items()}
    assert SchedulingConfig().with_stored(stored) == (config, [])


@pytest.mark.parametrize(
    ("updates", "key"),
    [
        ({"dispatch_policy": "random"}, "dispatch_policy"),
        ({"ttft_slo": 0}, "ttft_slo"),
        ({"tpot_slo": "-1"}, "tpot_slo"),
        ({"padg_variant": "mine"}, "padg_variant"),
        ({"prefill_rule": "guess"}, "prefill_rule"),
        ({"hold_outputs": "maybe"}, "hold_outputs"),
        ({"pending_timeout": -1}, "pending_timeout"),
        ({"n_lower": 4}, "n_lower"),  # 2*4 - 1 > the default n_upper 6
        ({"n_upper": 4}, "n_upper"),  # below 2*3 - 1
        ({"n_lower": 0}, "n_lower"),
    ],
)
def test_padg_configuration_rejects_naming_the_key(updates: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SchedulingConfig().updated(updates)
    assert caught.value.key == key


def test_coordinator_flags_are_the_scheduling_defaults() -> None:
    flags = CoordinatorConfig(dispatch_policy="padg", ttft_slo=2.0, n_lower=2, n_upper=3, lease_seconds=1.5)
    defaults = scheduling_defaults(flags)
    assert (defaults.dispatch_policy, defaults.ttft_slo, defaults.n_upper, defaults.lease_seconds) == (
        "padg",
        2.0,
        3,
        1.5,
    )
    with pytest.raises(ConfigError, match="dispatch_policy"):
        scheduling_defaults(CoordinatorConfig(dispatch_policy="fastest"))
