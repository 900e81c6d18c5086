"""Benchmark plots: PNGs are written, and what they draw is there (phase colours, one row per instance)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from services.bench.metrics import SLO
from services.bench.plots import PHASE_COLORS, plot_attainment, plot_latencies, plot_phases


def has_color(image: np.ndarray, name: str) -> bool:
    rgb = np.asarray(to_rgb(name))
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).any())


def is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def rolling(instances: int, windows: int, window: float = 1.0) -> list[tuple[float, str, str]]:
    """Rolling activation: one instance at a time holds the prefill window, the others decode."""
    timeline = []
    for w in range(windows):
        active = w % instances
        for i in range(instances):
            timeline.append((w * window, f"instance-{i}", "prefill" if i == active else "decode"))
    return timeline


def test_phases_plot_draws_each_phase(tmp_path):
    path = plot_phases(rolling(3, 6), tmp_path / "phases.png")
    assert is_png(path)
    image = imread(path)
    assert has_color(image, PHASE_COLORS["prefill"]) and has_color(image, PHASE_COLORS["decode"])


def test_phases_plot_only_draws_phases_that_occur(tmp_path):
    decode_only = [(t, "instance-0", "decode") for t in (0.0, 1.0, 2.0)] + [(0.5, "instance-1", "idle")]
    image = imread(plot_phases(decode_only, tmp_path / "p.png", end=3.0))
    assert has_color(image, PHASE_COLORS["decode"]) and has_color(image, PHASE_COLORS["idle"])
    assert not has_color(image, PHASE_COLORS["prefill"])


def test_phases_plot_grows_with_instances_and_rejects_empty(tmp_path):
    small = imread(plot_phases(rolling(2, 4), tmp_path / "two.png"))
    large = imread(plot_phases(rolling(8, 4), tmp_path / "eight.png"))
    assert large.shape[0] > small.shape[0]
    unknown = imread(plot_phases([(0.0, "a", "swapping"), (1.0, "a", "decode")], tmp_path / "u.png", end=2))
    assert has_color(unknown, "tab:green")  # a phase with no assigned colour gets one
    with pytest.raises(ValueError):
        plot_phases([], tmp_path / "none.png")


def test_attainment_plot(tmp_path):
    path = plot_attainment(
        [(1.0, 1.0), (2.0, 0.95), (4.0, 0.4)], 0.9, tmp_path / "sub" / "a.png", goodput=2.0
    )
    assert is_png(path)
    image = imread(path)
    assert has_color(image, "tab:green") and has_color(image, "tab:red")  # passing and failing runs


def test_latency_plot(tmp_path):
    records = [
        {"sent_s": 0.1, "ttft_s": 0.05, "tpot_s": 0.01, "meets_slo": True, "success": True},
        {"sent_s": 0.2, "ttft_s": 0.9, "tpot_s": 0.01, "meets_slo": False, "success": True},
        {"sent_s": 0.3, "ttft_s": None, "tpot_s": None, "meets_slo": False, "success": False},
    ]
    path = plot_latencies(records, SLO(ttft=0.5, tpot=0.05), tmp_path / "l.png")
    assert is_png(path)
    assert has_color(imread(path), "tab:red")
