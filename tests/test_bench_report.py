"""The benchmark's report: a JSON document that is valid JSON (also for an infinite rate), whose top-level
attainment and goodput are the right runs', and printed tables that show the numbers."""

from __future__ import annotations

import json
import math

from services.bench.client import RequestResult
from services.bench.metrics import SLO
from services.bench.report import SCHEMA, build_document, format_run, format_search, run_document, write_json
from services.bench.runner import Run
from services.bench.search import GoodputSearch

SLO_ = SLO(ttft=1.0, tpot=0.1)


def make_run(rate: float, ttfts: list[float]) -> dict:
    results = [
        RequestResult(
            i, 4, 3, scheduled=0.1 * i, sent=0.1 * i, success=True, ttft=t, e2e=t + 0.1, output_tokens=3
        )
        for i, t in enumerate(ttfts)
    ]
    return run_document(Run(rate, 1.0, 0, results, [[1]] * len(results), duration=2.0), SLO_)


def test_single_run_document_round_trips_through_json(tmp_path):
    run = make_run(math.inf, [0.2, 0.3, 2.0, 0.4])
    document = build_document({"workload": {"input_scale": 0.25}}, [run], None)
    path = write_json(document, tmp_path / "out" / "r.json")
    loaded = json.loads(path.read_text())  # strict JSON: no Infinity
    assert loaded["schema"] == SCHEMA and loaded["runs"][0]["rate"] == "inf"
    assert loaded["attainment"] == 0.75 and loaded["goodput_rps"] is None and loaded["search"] is None
    assert [r["meets_slo"] for r in loaded["runs"][0]["requests"]] == [True, True, False, True]
    assert loaded["runs"][0]["num_requests"] == 4


def test_search_document_reports_the_goodput_runs_attainment():
    search = GoodputSearch(target=0.5, start_rate=1.0, max_runs=3)
    runs = []
    for rate, ttfts in ((1.0, [0.1, 0.2]), (2.0, [0.1, 5.0]), (4.0, [5.0, 5.0])):
        runs.append(make_run(rate, ttfts))
        search.record(rate, runs[-1]["attainment"])
    document = build_document({}, runs, search)
    assert document["goodput_rps"] == 2.0 and document["attainment"] == 0.5
    assert document["search"]["lowest_failing_rate"] == 4.0
    table = format_search(search, runs)
    assert "between 2 (met) and 4 (missed)" in table and table.count("\n") == 6


def test_run_table_shows_the_numbers():
    table = format_run(make_run(2.0, [0.25, 0.35]), SLO_, 0.9)
    assert "Successful requests:" in table and "1.000" in table
    ttft_row = next(line for line in table.splitlines() if line.startswith("TTFT"))
    assert ttft_row.split()[1:] == ["300.00", "300.00", "340.00", "349.00"]
