"""The coordinator's FuDG pieces without a cluster: in-flight entries under both instances (the decode one
waiting for its KV), the `fudg` dispatch policy and its errors, PaDG leaving role instances alone, and the
instance's --fudg-role flag."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from coordinator_support import make_info, make_status

from services.coordinator.fudg_dispatcher import dispatch_fudg
from services.coordinator.inflight import KV_GRACE, Inflight, InflightTracker
from services.coordinator.padg_dispatcher import prefill_model
from services.coordinator.prefill_model import ProfileError
from services.coordinator.registry import PENDING_REPORTS, Registry
from services.coordinator.scheduling_config import ConfigError, SchedulingConfig
from shared.config import InstanceConfig
from shared.messages import ErrorReply, SubmitRequest


def pair(tracker: InflightTracker, request_id: str = "r") -> None:
    common = {"request_id": request_id, "reply_subject": "router.r", "prompt_tokens": 8, "dispatched_at": 0.0}
    tracker.add(Inflight(instance_id="p", partner="d", **common))
    tracker.add(Inflight(instance_id="d", partner="p", awaiting_kv=True, **common))


def test_decode_entry_waits_for_its_kv_then_counts_misses():
    tracker = InflightTracker()
    pair(tracker)
    for _ in range(PENDING_REPORTS + 2):  # the KV has not arrived: absence is no miss
        tracker.observe(make_status("d"), now=1.0)
    assert tracker.get("d", "r") is not None
    tracker.observe(make_status("p", request_ids=("r",)), now=1.0)
    tracker.observe(make_status("p"), now=2.0)  # handed off: the prefill instance let go
    assert tracker.get("p", "r") is None and tracker.get("d", "r").released_at == 2.0
    tracker.observe(make_status("d", request_ids=("r",)), now=2.5)  # the decode instance has it
    tracker.observe(make_status("d"), now=3.0)  # and finished it
    assert len(tracker) == 0


def test_decode_entry_gives_up_after_the_grace_without_a_transfer():
    # E.g. the request finished at its first token: the prefill instance never ships its KV.
    tracker = InflightTracker()
    pair(tracker)
    tracker.observe(make_status("p"), now=0.0)
    for _ in range(PENDING_REPORTS - 1):
        tracker.observe(make_status("p"), now=0.0)
    assert tracker.get("d", "r").released_at == 0.0
    for _ in range(PENDING_REPORTS):
        tracker.observe(make_status("d"), now=KV_GRACE - 1)
    assert tracker.get("d", "r") is not None
    for _ in range(PENDING_REPORTS):
        tracker.observe(make_status("d"), now=KV_GRACE + 1)
    assert len(tracker) == 0


def test_transfer_reports_settle_the_decode_entry():
    tracker = InflightTracker()
    pair(tracker, "refused")
    pair(tracker, "taken")
    tracker.transfer_done("refused", "d", accepted=False)  # the prefill instance kept it
    assert tracker.get("d", "refused") is None and tracker.get("p", "refused") is not None
    tracker.transfer_done("taken", "d", accepted=True)
    tracker.transfer_done("unknown", "d", accepted=True)  # nothing to do
    for _ in range(PENDING_REPORTS):
        tracker.observe(make_status("d"), now=1.0)
    assert tracker.get("d", "taken") is None  # finished between two reports


def test_losing_one_instance_takes_both_entries():
    tracker = InflightTracker()
    pair(tracker)
    (lost,) = tracker.take_instance("d")
    assert (lost.instance_id, lost.partner) == ("d", "p")
    assert len(tracker) == 0  # one terminal chunk per stream: the partner's entry goes too


def test_fudg_is_a_dispatch_policy():
    assert SchedulingConfig().updated({"dispatch_policy": "fudg"}).dispatch_policy == "fudg"
    with pytest.raises(ConfigError, match="dispatch_policy"):
        SchedulingConfig().updated({"dispatch_policy": "distserve"})


def submit() -> SubmitRequest:
    return SubmitRequest(
        request_id="r",
        model="tiny",
        prompt_token_ids=[1, 2, 3],
        sampling={},
        reply_subject="router.r",
        router_id="router",
        arrival_time=0.0,
        stream=False,
    )


async def test_fudg_dispatch_without_role_instances_says_what_is_missing():
    registry = Registry(lease_seconds=3.0)
    registry.register(make_info("mixed-0"), "m0", now=0.0)
    sender = SimpleNamespace(
        registry=registry, inflight=InflightTracker(), scheduling=SchedulingConfig(), nc=None
    )
    reply = await dispatch_fudg(sender, submit())  # type: ignore[arg-type]
    assert isinstance(reply, ErrorReply) and reply.code == "unavailable"
    assert "no ready prefill instance" in reply.message and "--fudg-role" in reply.message
    registry.register(dataclasses.replace(make_info("p0"), role="prefill"), "m0", now=0.0)
    reply = await dispatch_fudg(sender, submit())  # type: ignore[arg-type]
    assert isinstance(reply, ErrorReply) and "no ready decode instance" in reply.message
    assert len(sender.inflight) == 0 and not registry.get("p0").pending


def test_padg_leaves_role_instances_alone():
    registry = Registry(lease_seconds=3.0)
    record, _ = registry.register(dataclasses.replace(make_info("d0"), role="decode"), "m0", now=0.0)
    with pytest.raises(ProfileError, match="FuDG decode role"):
        prefill_model(record, "interpolate")


def test_instance_fudg_role_flag(monkeypatch, capsys):
    assert InstanceConfig().fudg_role == "none"
    with pytest.raises(ValueError, match="fudg_role"):
        InstanceConfig(fudg_role="both")
    from services.instance.__main__ import build_parser, main

    args = build_parser().parse_args(["--fudg-role", "decode"])
    assert InstanceConfig.from_args(args).fudg_role == "decode"
    monkeypatch.setenv("ECOSERVE_FUDG_ROLE", "prefill")
    assert InstanceConfig.from_args(build_parser().parse_args([])).fudg_role == "prefill"
    with pytest.raises(SystemExit) as exit_:  # PaDG windows and FuDG roles do not mix
        main(["--policy", "padg"])
    assert exit_.value.code == 2
    assert "--fudg-role prefill needs --policy nodg or sarathi" in capsys.readouterr().err
