"""The benchmark's phase timeline: real InstanceStatus reports published on the session's nats-server are
recorded as transitions per instance, sliced per run, and drawn with the prefill-window band."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from services.bench.phases import PhaseBook, PhaseRecorder
from services.bench.plots import PHASE_COLORS, WINDOW_COLOR, plot_phases
from shared import subjects
from shared.kv_messages import KvHandoffSkipped, KvTransferReport
from shared.messages import InstanceStatus
from shared.wire import encode


def status(
    instance: str, seq: int, at: float, phase: str, window: bool | None, epoch: int = 0
) -> InstanceStatus:
    return InstanceStatus(
        instance_id=instance,
        seq=seq,
        time=at,
        state="ready",
        phase=phase,
        num_running=1,
        num_waiting=0,
        kv_blocks_free=10,
        kv_blocks_total=16,
        num_preemptions=0,
        requests=[],
        prefill_window=window,
        window_epoch=epoch,
    )


def has_color(image: np.ndarray, name: str) -> bool:
    rgb = np.asarray(to_rgb(name))
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).any())


async def test_recorder_keeps_transitions_of_real_reports(nats_server, nats_client, ecoserve_prefix):
    t0 = 1_000_000.0
    # Rolling activation over two instances: the window moves 0 → 1 → 0; repeated reports are not transitions.
    reports = [
        status("instance-0", 0, t0 + 0.0, "prefill", True, 1),
        status("instance-1", 0, t0 + 0.0, "decode", False, 1),
        status("instance-0", 1, t0 + 0.5, "prefill", True, 1),  # same state: dropped
        status("instance-0", 2, t0 + 1.0, "decode", False, 2),
        status("instance-1", 1, t0 + 1.0, "prefill", True, 2),
        status("instance-1", 2, t0 + 2.0, "decode", False, 3),
        status("instance-0", 3, t0 + 2.0, "prefill", True, 3),
    ]
    recorder = PhaseRecorder(nats_server.url, ecoserve_prefix)
    async with recorder:
        for report in reports:
            await nats_client.publish(subjects.status(ecoserve_prefix, report.instance_id), encode(report))
        await nats_client.publish(subjects.status(ecoserve_prefix, "instance-0"), b"not msgpack")
        # Another cluster's reports (another prefix) are not ours.
        await nats_client.publish(subjects.status("elsewhere", "instance-9"), encode(reports[0]))
        await nats_client.flush()
        for _ in range(100):
            if recorder.book.reports + recorder.book.dropped == len(reports) + 1:
                break
            await asyncio.sleep(0.02)
    book = recorder.book
    assert book.reports == len(reports) and book.dropped == 1
    assert book.ready() == {"instance-0", "instance-1"}
    assert [(r.phase, r.prefill_window) for r in book.records["instance-0"]] == [
        ("prefill", True),
        ("decode", False),
        ("prefill", True),
    ]

    # A run from t0+0.75 to t0+1.5: each instance's state at the start (t=0), then what changed inside.
    window = book.between(t0 + 0.75, t0 + 1.5)
    assert [(r["t"], r["instance"], r["phase"], r["prefill_window"]) for r in window] == [
        (0.0, "instance-0", "prefill", True),
        (0.0, "instance-1", "decode", False),
        (0.25, "instance-0", "decode", False),
        (0.25, "instance-1", "prefill", True),
    ]
    assert window[-1]["epoch"] == 2


def test_book_ignores_stale_reports_and_handles_other_policies():
    book = PhaseBook()
    book.add(status("a", 5, 10.0, "decode", None))
    book.add(status("a", 4, 9.0, "prefill", None))  # older than what we have: out of order
    book.add(status("a", 0, 11.0, "mixed", None))  # a restarted instance numbers from 0 again
    assert [r.phase for r in book.records["a"]] == ["decode", "mixed"]
    assert book.between(20.0, 30.0) == [
        {"t": 0.0, "instance": "a", "phase": "mixed", "prefill_window": None, "epoch": 0}
    ]


def test_phase_plot_draws_the_window_band_only_when_windows_are_known(tmp_path):
    padg = [(0.0, "i0", "prefill", True), (0.0, "i1", "decode", False), (1.0, "i0", "decode", False)]
    padg += [(1.0, "i1", "prefill", True)]
    image = imread(plot_phases(padg, tmp_path / "padg.png", end=2.0))
    assert has_color(image, WINDOW_COLOR) and has_color(image, PHASE_COLORS["prefill"])
    sarathi = [(0.0, "i0", "mixed", None), (1.0, "i0", "decode", None)]
    image = imread(plot_phases(sarathi, tmp_path / "sarathi.png", end=2.0))
    assert has_color(image, PHASE_COLORS["mixed"]) and not has_color(image, WINDOW_COLOR)


def test_bench_fails_fast_when_nats_is_unreachable(capsys):
    from services.bench.__main__ import main

    argv = ["--url", "http://127.0.0.1:9", "--nats", "nats://127.0.0.1:9", "--rate", "1", "--no-progress"]
    assert main(argv) == 1
    assert "cannot subscribe to status reports at nats://127.0.0.1:9" in capsys.readouterr().err


def transfer(request_id: str, at: float, seconds: float, accepted: bool = True) -> KvTransferReport:
    return KvTransferReport(
        request_id=request_id,
        prefill_instance_id="p0",
        decode_instance_id="d0",
        accepted=accepted,
        num_tokens=10,
        kv_bytes=1000,
        wire_bytes=1100,
        num_chunks=1,
        export_seconds=0.001,
        transfer_seconds=seconds,
        import_seconds=0.002,
        time=at,
    )


def test_book_sums_the_kv_transfers_of_a_run():
    book = PhaseBook()
    assert book.transfers_between(0.0, 100.0) is None  # no FuDG: nothing to report
    for i, (at, seconds) in enumerate([(9.0, 9.0), (10.0, 0.01), (11.0, 0.03), (12.0, 0.02), (13.0, 0.05)]):
        book.add_transfer(transfer(f"r{i}", at, seconds, accepted=i != 2))
    summary = book.transfers_between(10.0, 12.5)  # r0 (before) and r4 (after) are other runs'
    assert summary is not None
    assert (summary["count"], summary["refused"], summary["tokens"]) == (3, 1, 30)
    assert (summary["kv_bytes"], summary["wire_bytes"]) == (3000, 3300)
    assert summary["seconds_mean"] == pytest.approx(0.02)
    assert summary["seconds_p50"] == pytest.approx(0.02)
    assert summary["seconds_p90"] == pytest.approx(0.028)  # between 0.02 and 0.03, 80% of the way


async def test_recorder_records_kv_transfer_reports(nats_server, nats_client, ecoserve_prefix):
    recorder = PhaseRecorder(nats_server.url, ecoserve_prefix)
    async with recorder:
        await nats_client.publish(subjects.kv_transfers(ecoserve_prefix), encode(transfer("r", 5.0, 0.1)))
        skipped = KvHandoffSkipped(
            request_id="s", prefill_instance_id="p0", decode_instance_id="d0", time=6.0
        )
        await nats_client.publish(subjects.kv_transfers(ecoserve_prefix), encode(skipped))  # moved nothing
        await nats_client.publish(subjects.kv_transfers(ecoserve_prefix), b"garbage")
        await nats_client.flush()
        for _ in range(100):
            if recorder.book.transfers and recorder.book.dropped:
                break
            await asyncio.sleep(0.02)
    assert [t.request_id for t in recorder.book.transfers] == ["r"] and recorder.book.dropped == 1
