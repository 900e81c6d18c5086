"""Benchmark workloads (pure): seeded lengths within bounds whose means match the scaled targets, the same
requests for every run length, and JSONL files parsed with errors that name the line."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from services.bench.workloads import (
    DATASETS,
    FileWorkload,
    LengthDist,
    RequestSpec,
    SyntheticWorkload,
    WorkloadError,
    clipped_lognormal_mean,
    load_workload,
)

N = 20_000


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_default_scaling_gives_the_scaled_paper_means_within_bounds(name):
    shape = DATASETS[name]
    workload = load_workload(name, seed=3)
    requests = workload.requests(N)
    inputs = [r.input_len for r in requests]
    outputs = [r.output_len for r in requests]
    assert workload.input.low <= min(inputs) and max(inputs) <= workload.input.high
    assert workload.output.low <= min(outputs) and max(outputs) <= workload.output.high
    # The clipped distribution is calibrated to the target mean; the rest is sampling and rounding noise.
    assert statistics.mean(inputs) == pytest.approx(shape.input.mean * shape.default_scale, rel=0.04)
    assert statistics.mean(outputs) == pytest.approx(shape.output.mean * shape.default_scale, rel=0.04)
    described = workload.describe()
    assert described["input_scale"] == described["output_scale"] == shape.default_scale
    assert described["paper_mean_input"] == shape.input.mean


def test_scales_override_the_default_per_direction():
    workload = load_workload("sharegpt", input_scale=0.5, output_scale=0.1, seed=1)
    requests = workload.requests(N)
    assert statistics.mean(r.input_len for r in requests) == pytest.approx(343.76 * 0.5, rel=0.05)
    assert statistics.mean(r.output_len for r in requests) == pytest.approx(237.20 * 0.1, rel=0.05)
    assert workload.input.high == 1024 and workload.output.high == 102  # bounds scale with the means


def test_ratio_of_input_to_output_is_what_tells_the_workloads_apart():
    means = {}
    for name in DATASETS:
        requests = load_workload(name).requests(5000)
        means[name] = statistics.mean(r.input_len for r in requests) / statistics.mean(
            r.output_len for r in requests
        )
    assert means["alpaca"] < 0.2 < 1 < means["sharegpt"] < 2 < 20 < means["longbench"]


def test_seeded_and_the_same_prefix_for_any_run_length():
    a = load_workload("alpaca", seed=7)
    assert a.requests(50) == load_workload("alpaca", seed=7).requests(50)
    assert a.requests(10) == a.requests(200)[:10]
    assert a.requests(50) != load_workload("alpaca", seed=8).requests(50)


def test_clipped_lognormal_mean_matches_monte_carlo():
    rng = np.random.default_rng(0)
    x = np.clip(rng.lognormal(3.0, 1.2, 400_000), 5.0, 60.0)
    assert clipped_lognormal_mean(3.0, 1.2, 5.0, 60.0) == pytest.approx(float(x.mean()), rel=0.005)


def test_length_dist_rejects_inconsistent_bounds():
    with pytest.raises(WorkloadError):
        LengthDist(mean=10, sigma=0.5, low=20, high=30)
    with pytest.raises(WorkloadError):
        LengthDist(mean=10, sigma=0, low=1, high=30)
    with pytest.raises(WorkloadError):
        SyntheticWorkload(DATASETS["alpaca"], input_scale=0)


def test_jsonl_file_in_order_and_cycled(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"prompt": "hello there", "max_tokens": 5}\n'
        "\n"
        '{"prompt_token_ids": [11, 12, 13], "output_len": 7}\n'
        '{"prompt": [1, 2], "max_tokens": 2}\n'
    )
    workload = load_workload(str(path))
    assert isinstance(workload, FileWorkload)
    assert workload.requests(4) == [
        RequestSpec(None, 5, "hello there"),
        RequestSpec(3, 7, [11, 12, 13]),
        RequestSpec(2, 2, [1, 2]),
        RequestSpec(None, 5, "hello there"),
    ]
    assert workload.describe()["requests_in_file"] == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"}', "'max_tokens', 'output_len' is required"),
        ('{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be a positive integer"),
        ('{"prompt": "", "max_tokens": 3}', "'prompt' must be"),
        ('{"prompt_token_ids": [1, -2], "max_tokens": 3}', "'prompt' must be"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not JSON"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "max_tokens": 1}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=r"bad\.jsonl:2") as caught:
        load_workload(str(path))
    assert message in str(caught.value)


def test_unknown_workload_and_scale_on_a_file_are_errors(tmp_path):
    with pytest.raises(WorkloadError, match="unknown workload"):
        load_workload("imagenet")
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "x", "max_tokens": 1}\n')
    with pytest.raises(WorkloadError, match="synthetic workloads only"):
        load_workload(str(path), input_scale=0.5)
