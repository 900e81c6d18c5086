"""The strategy comparison's tables (services/bench/results.py) and the experiment script's decisions that
need no cluster: goodput read off runs, PaDG's ratios against the bars, the markdown, strategies not on
offer."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from services.bench import results

REPO = Path(__file__).resolve().parents[1]


def experiment_module() -> Any:
    spec = importlib.util.spec_from_file_location("experiment", REPO / "bench" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("experiment", module)
    spec.loader.exec_module(module)
    return module


def bench_run(rate: float, ttfts: list[float], tpots: list[float | None], failed: int = 0) -> dict[str, Any]:
    """A bench report's run with the fields results.py reads; SLO 1 s / 0.1 s."""
    requests = [
        {"success": True, "ttft_s": ttft, "tpot_s": tpot, "meets_slo": ttft <= 1 and (tpot or 0) <= 0.1}
        for ttft, tpot in zip(ttfts, tpots, strict=True)
    ] + [{"success": False, "ttft_s": None, "tpot_s": None, "meets_slo": False}] * failed
    good = sum(r["meets_slo"] for r in requests)
    dist = {"median": 0.5, "p90": 0.9}
    return {
        "rate": rate,
        "num_requests": len(requests),
        "attainment": good / len(requests),
        "failed": failed,
        "ttft": dist,
        "tpot": dist,
        "output_throughput": 10.0,
        "duration_s": 5.0,
        "requests": requests,
    }


def report(*runs: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": {
            "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
            "workload": {"input_scale": 0.25, "output_scale": 0.25},
        },
        "runs": list(runs),
    }


def cell(strategy: str, workload: str, attainments: dict[float, float], bg: float = 0.0) -> dict[str, Any]:
    """A cell whose run at each rate has the given attainment (10 requests; misses are TTFT misses)."""
    runs = []
    for rate, att in attainments.items():
        good = round(att * 10)
        runs.append(bench_run(rate, [0.1] * good + [2.0] * (10 - good), [0.01] * 10))
    return results.cell_from_report(strategy, workload, report(*runs), background={"background_cores": bg})


def test_goodput_is_the_highest_rate_meeting_each_level():
    c = cell("padg", "sharegpt", {1.0: 1.0, 2.0: 0.9, 4.0: 0.5, 3.0: 0.6})
    assert c["goodput"] == {"p50": 4.0, "p90": 2.0, "p99": 1.0}
    assert c["bracketed"] == {"p50": False, "p90": True, "p99": True}  # nothing above 4 was tried
    none = cell("nodg", "sharegpt", {1.0: 0.2})
    assert none["goodput"]["p90"] == 0.0 and none["bracketed"]["p90"] is True
    assert "| sharegpt | P90 | < 1.00 |" in results.goodput_table([none], ["nodg"], ["sharegpt"])


def test_goodput_stops_at_the_first_miss_when_noise_breaks_monotonicity():
    noisy = cell("sarathi", "sharegpt", {1.0: 1.0, 2.0: 0.3, 3.0: 0.9})
    assert noisy["goodput"]["p90"] == 1.0 and not results.monotonic(noisy["runs"])
    assert results.monotonic(cell("nodg", "sharegpt", {1.0: 1.0, 2.0: 0.5})["runs"])
    text = "\n".join(results.reading([noisy], ["sharegpt"]))
    assert (
        "sarathi's attainment is not monotonic in the rate (1.00 at 1.00, 0.30 at 2.00, 0.90 at 3.00)" in text
    )


def test_run_summary_counts_misses_by_cause():
    run = bench_run(1.0, [0.1, 2.0, 0.2], [0.01, 0.01, 0.5], failed=1)
    summary = results.run_summary(run, {"ttft_s": 1.0, "tpot_s": 0.1})
    assert summary["misses"] == {"ttft": 1, "tpot": 1, "failed": 1}
    assert summary["attainment"] == 0.25 and "requests" not in summary


def test_ratios_take_the_better_nodg_family_baseline_and_fudg():
    cells = [
        cell("padg", "sharegpt", {1.0: 1.0, 2.0: 1.0, 4.0: 0.5}),
        cell("nodg", "sharegpt", {1.0: 1.0, 2.0: 0.5}),
        cell("sarathi", "sharegpt", {0.5: 1.0, 1.0: 0.95, 2.0: 0.2}),
        results.skipped_cell("fudg", "sharegpt", "not run", "no --strategy fudg"),
    ]
    r = results.ratios(cells, "sharegpt", "p90")
    assert r["best_nodg_family"] == 1.0 and r["vs_nodg_family"] == pytest.approx(2.0)
    assert r["vs_fudg"] is None
    assert results.ratios(cells, "longbench", "p90")["vs_nodg_family"] is None
    zero = [cell("padg", "alpaca", {1.0: 1.0}), cell("nodg", "alpaca", {1.0: 0.0})]
    assert results.ratios(zero, "alpaca", "p90")["vs_nodg_family"] == float("inf")


def document(cells: list[dict[str, Any]], quick: bool = False) -> dict[str, Any]:
    settings = {
        "scale": 0.25,
        "mean_input": 85.9,
        "mean_output": 59.3,
        "slo_ttft": 5.0,
        "slo_tpot": 0.1,
        "start_rate": 1.0,
    }
    return {
        "created": "2026-11-21T10:00:00+00:00",
        "command": "bench/experiment.py",
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "memory_gib": 24.0,
            "python": "3.11",
            "torch": "2.13.0+cpu",
            "commit": "abc1234",
            "dirty": False,
            "loadavg_start": "0.1 0.1 0.1",
            "loadavg_end": "1.9 1.5 1.0",
        },
        "setup": {
            "quick": quick,
            "strategies": list(results.STRATEGIES),
            "workloads": ["sharegpt"],
            "model": "SmolLM2",
            "dtype": "bf16",
            "instances": 2,
            "threads_per_instance": 1,
            "max_num_batched_tokens": 512,
            "search": {"factor": 2.0, "tolerance": 0.2, "max_runs": 5, "duration_s": 20.0, "seed": 0},
            "slo_scales": {"ttft": 1.0, "tpot": 2.0},
            "workload_settings": {"sharegpt": settings},
            "reproduce": "make experiment",
            "raw_dir": "bench/results/experiment",
            "summary_json": "docs/results/results.json",
        },
        "notes": [],
        "cells": cells,
        "plots": {"attainment-sharegpt": "results/attainment-sharegpt.png"},
    }


def test_markdown_has_the_tables_the_bars_and_an_honest_banner():
    cells = [
        cell("padg", "sharegpt", {1.0: 1.0, 2.0: 1.0, 4.0: 0.5}),
        cell("nodg", "sharegpt", {1.0: 1.0, 2.0: 0.5}, bg=0.6),
        cell("sarathi", "sharegpt", {1.0: 1.0, 2.0: 0.4}),
        results.skipped_cell(
            "fudg", "sharegpt", "not run", "`ecoserve up --strategy` does not offer fudg\nyet"
        ),
    ]
    text = results.render_markdown(document(cells))
    assert "| sharegpt | P90 | 2.00 | 1.00 | 1.00 | not run |" in text
    assert "| sharegpt | P90 | 2.00× (meets 1.3×) | – |" in text
    assert "Preliminary" in text and "nodg×sharegpt up to 0.60" in text and "not run: fudg" in text
    assert "- fudg × sharegpt: not run: `ecoserve up --strategy` does not offer fudg yet" in text
    assert "padg first missed P90 at 4.00 req/s (attainment 0.50; of 10 requests 5 over the TTFT SLO" in text
    assert "![attainment vs rate, sharegpt](results/attainment-sharegpt.png)" in text
    assert "`make experiment`" in text and "No timeline was recorded." in text
    # Every run listed, sorted by rate within a cell.
    assert text.count("| padg | sharegpt |") == 3

    quiet = [cell(s, "sharegpt", {1.0: 1.0}) for s in results.STRATEGIES]
    assert "Preliminary" not in results.render_markdown(document(quiet))
    assert "quick mode" in results.render_markdown(document(quiet, quick=True))


def test_experiment_records_strategies_the_launcher_does_not_offer(tmp_path):
    experiment = experiment_module()
    launcher = experiment.Launcher(strategies=["nodg", "sarathi"], flags={"--strategy"})
    args = argparse.Namespace()
    skipped = experiment.run_cell(args, launcher, experiment.Cell("fudg", "longbench", tmp_path))
    assert skipped["status"] == "not run" and "offers nodg, sarathi" in skipped["reason"]


def test_experiment_passes_slos_to_the_launcher_only_when_it_takes_them(tmp_path):
    experiment = experiment_module()
    args = experiment.build_parser().parse_args(["--model", "/m"])
    cell_ = experiment.Cell("padg", "longbench", tmp_path)
    plain = experiment.up_argv(args, experiment.Launcher(["padg"], set()), cell_, 8000, "p")
    assert "--ttft-slo" not in plain and plain[plain.index("--threads-per-instance") + 1] == "1"
    slo = experiment.up_argv(
        args, experiment.Launcher(["padg"], {"--ttft-slo", "--tpot-slo"}), cell_, 8000, "p"
    )
    assert slo[slo.index("--ttft-slo") + 1] == "15.0" and slo[slo.index("--tpot-slo") + 1] == "0.2"
    args = experiment.build_parser().parse_args(["--quick"])
    experiment.apply_quick(args)
    assert args.workloads == ["sharegpt"] and args.max_runs == 2 and args.duration == 4.0


def test_rerender_rewrites_the_outputs_with_a_discussion(tmp_path):
    experiment = experiment_module()
    cells = [cell(s, "sharegpt", {1.0: 1.0, 2.0: 0.5}) for s in ("padg", "nodg")]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(document(cells)))
    notes = tmp_path / "notes.md"
    notes.write_text("PaDG and NoDG tie here because …\n")
    out, markdown = tmp_path / "results", tmp_path / "results.md"
    argv = ["--rerender", str(summary), "--discussion", str(notes), "--out-dir", str(out)]
    assert experiment.main([*argv, "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    assert "PaDG and NoDG tie here because …" in text
    assert "![attainment vs rate, sharegpt](results/attainment-sharegpt.png)" in text
    assert json.loads((out / "results.json").read_text())["discussion"].startswith("PaDG and NoDG tie")


def test_fudg_runs_get_a_kv_transfer_table_and_a_split():
    fudg = cell("fudg", "sharegpt", {1.0: 1.0, 2.0: 0.5})
    assert results.transfers_table([fudg]) is None  # no run recorded transfers
    moved = {"count": 12, "refused": 1, "kv_bytes": 3 * 2**20, "wire_bytes": 4 * 2**20, "tokens": 400}
    moved |= {"seconds_mean": 0.0042, "seconds_p50": 0.004, "seconds_p90": 0.0075}
    runs = [bench_run(1.0, [0.1] * 10, [0.01] * 10) | {"kv_transfers": moved}]
    fudg = results.cell_from_report("fudg", "sharegpt", report(*runs))
    text = results.render_markdown(document([fudg]))
    assert "## FuDG KV transfers" in text
    assert "| fudg | sharegpt | 1.00 | 12 (1) | 3.0 / 4.0 | 4.2 / 4.0 / 7.5 |" in text

    experiment = experiment_module()
    args = experiment.build_parser().parse_args(["--model", "/m"])
    launcher = experiment.Launcher(["fudg"], {"--fudg-split"})
    argv = experiment.up_argv(args, launcher, experiment.Cell("fudg", "sharegpt", Path(".")), 8000, "p")
    total = int(argv[argv.index("--instances") + 1])
    prefill, decode = map(int, argv[argv.index("--fudg-split") + 1].split(":"))
    assert prefill + decode == total and prefill >= decode >= 1
