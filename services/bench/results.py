"""The strategy comparison's results (bench/experiment.py): per-cell summaries of `ecoserve bench` reports,
goodput at several attainment levels, the PaDG ratios against the issue's bars, and `docs/results.md`.

Pure: no I/O beyond what the caller passes in, so the tables are tested without running a cluster.

A cell is one (strategy, workload) pair: `status` "ok", "not run" (the launcher rejects the strategy, with
the reason) or "failed" (the cluster or the benchmark broke, with the reason). Goodput at an attainment
level is read off the cell's runs: the highest rate up to which every rate tried met the level (0 when the
lowest missed). The search itself aims at P90, so P50 and P99 come from the same runs and are coarser (a P99
goodput below the search's first rate shows as 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

SCHEMA = "ecoserve-experiment/1"
STRATEGIES = ("padg", "nodg", "sarathi", "fudg")
WORKLOADS = ("alpaca", "sharegpt", "longbench")
LEVELS = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
NODG_BAR = 1.3  # PaDG P90 goodput ≥ 1.3 × the better of NoDG and Sarathi (ShareGPT, LongBench)
FUDG_BAR = 1.5  # and ≥ 1.5 × FuDG
BAR_WORKLOADS = ("sharegpt", "longbench")
CONTENDED_CORES = 0.2  # background load above which numbers are not comparable (docs/benchmarks.md)


def goodput(runs: Sequence[dict[str, Any]], target: float) -> float:
    """The highest rate up to which every rate tried met `target` (0 when the lowest missed).

    Stricter than the search's own goodput_rps (the highest passing rate) when noise makes attainment rise
    again above a failing rate; `monotonic` flags those cells."""
    best = 0.0
    for run in sorted(runs, key=lambda r: r["rate"]):
        if run["attainment"] < target:
            break
        best = run["rate"]
    return best


def monotonic(runs: Sequence[dict[str, Any]], slack: float = 0.1) -> bool:
    """Whether attainment never rises with the rate by more than `slack` (a request or two of a short run);
    more than that is noise, such as a burst of background load during the lower rate's run."""
    ordered = [r["attainment"] for r in sorted(runs, key=lambda r: r["rate"])]
    return all(b <= a + slack + 1e-9 for a, b in pairwise(ordered))


def bracketed(runs: Sequence[dict[str, Any]], target: float) -> bool:
    """Whether some rate above the goodput missed `target` (else the goodput is only a lower bound)."""
    best = goodput(runs, target)
    return any(r["rate"] > best and r["attainment"] < target for r in runs)


def run_summary(run: dict[str, Any], slo: dict[str, float]) -> dict[str, Any]:
    """One rate run of a bench report, without its per-request records: what the tables and plots need."""
    requests = run["requests"]
    ttft_miss = sum(1 for r in requests if r["success"] and r["ttft_s"] > slo["ttft_s"])
    tpot_miss = sum(1 for r in requests if r["success"] and (r["tpot_s"] or 0.0) > slo["tpot_s"])
    return {
        "rate": run["rate"],
        "num_requests": run["num_requests"],
        "attainment": run["attainment"],
        "failed": run["failed"],
        "misses": {"ttft": ttft_miss, "tpot": tpot_miss, "failed": run["failed"]},
        "ttft_p50_s": run["ttft"]["median"],
        "ttft_p90_s": run["ttft"]["p90"],
        "tpot_p50_s": run["tpot"]["median"],
        "tpot_p90_s": run["tpot"]["p90"],
        "output_throughput": run["output_throughput"],
        "duration_s": run["duration_s"],
        "kv_transfers": run.get("kv_transfers"),  # FuDG only (ecoserve bench --nats)
    }


def cell_from_report(strategy: str, workload: str, report: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A finished cell from its `ecoserve bench --search` JSON report."""
    slo = report["config"]["slo"]
    runs = [run_summary(r, slo) for r in report["runs"]]
    return {
        "strategy": strategy,
        "workload": workload,
        "status": "ok",
        "reason": None,
        "slo": slo,
        "scale": {k: report["config"]["workload"].get(k) for k in ("input_scale", "output_scale")},
        "runs": runs,
        **score(runs),
        **extra,
    }


def score(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A cell's goodput and bracketing at every level (recomputed when re-rendering old summaries)."""
    return {
        "goodput": {level: goodput(runs, target) for level, target in LEVELS.items()},
        "bracketed": {level: bracketed(runs, target) for level, target in LEVELS.items()},
    }


def skipped_cell(strategy: str, workload: str, status: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"strategy": strategy, "workload": workload, "status": status, "reason": reason, **extra}


def find(cells: Sequence[dict[str, Any]], strategy: str, workload: str) -> dict[str, Any] | None:
    return next((c for c in cells if c["strategy"] == strategy and c["workload"] == workload), None)


def _goodput_of(cells: Sequence[dict[str, Any]], strategy: str, workload: str, level: str) -> float | None:
    cell = find(cells, strategy, workload)
    return cell["goodput"][level] if cell and cell["status"] == "ok" else None


def ratios(cells: Sequence[dict[str, Any]], workload: str, level: str) -> dict[str, Any]:
    """PaDG's goodput over the better NoDG-family baseline and over FuDG (None where a side is missing)."""
    padg = _goodput_of(cells, "padg", workload, level)
    family = [g for s in ("nodg", "sarathi") if (g := _goodput_of(cells, s, workload, level)) is not None]
    fudg = _goodput_of(cells, "fudg", workload, level)

    def over(base: float | None) -> float | None:
        if padg is None or base is None:
            return None
        if base == 0:
            return None if padg == 0 else float("inf")
        return padg / base

    best = max(family) if family else None
    return {"vs_nodg_family": over(best), "best_nodg_family": best, "vs_fudg": over(fudg)}


# ---- markdown ----------------------------------------------------------------------------------------------


def _rate(value: float | None, bound: bool = False) -> str:
    if value is None:
        return "–"
    return f"≥ {value:.2f}" if bound else f"{value:.2f}"


def _ratio(value: float | None, bar: float | None = None) -> str:
    if value is None:
        return "–"
    text = "∞" if value == float("inf") else f"{value:.2f}×"
    if bar is None:
        return text
    return f"{text} ({'meets' if value >= bar else 'misses'} {bar:g}×)"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def _cell_text(cell: dict[str, Any] | None, level: str) -> str:
    if cell is None:
        return "–"
    if cell["status"] != "ok":
        return cell["status"]
    value = cell["goodput"][level]
    if value == 0 and cell["runs"]:  # even the lowest rate tried missed: an upper bound
        return f"< {min(r['rate'] for r in cell['runs']):.2f}"
    return _rate(value, bound=not cell["bracketed"][level])


def goodput_table(
    cells: Sequence[dict[str, Any]], strategies: Sequence[str], workloads: Sequence[str]
) -> str:
    head = ["workload", "level", *strategies]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload in workloads:
        for level in LEVELS:
            values = [_cell_text(find(cells, s, workload), level) for s in strategies]
            rows.append(f"| {workload} | {level.upper()} | " + " | ".join(values) + " |")
    return "\n".join(rows)


def ratio_table(cells: Sequence[dict[str, Any]], workloads: Sequence[str]) -> str:
    rows = [
        "| workload | level | PaDG ÷ best(NoDG, Sarathi) | PaDG ÷ FuDG |",
        "|---|---|---|---|",
    ]
    for workload in workloads:
        for level in LEVELS:
            r = ratios(cells, workload, level)
            bars = level == "p90" and workload in BAR_WORKLOADS
            rows.append(
                f"| {workload} | {level.upper()} | {_ratio(r['vs_nodg_family'], NODG_BAR if bars else None)} "
                f"| {_ratio(r['vs_fudg'], FUDG_BAR if bars else None)} |"
            )
    return "\n".join(rows)


def background(cell: dict[str, Any], run: dict[str, Any] | None = None) -> float | None:
    """Cores other processes used during `run` (the experiment samples them), else during the whole cell."""
    measured = (run or {}).get("cpu") or cell.get("background") or {}
    return measured.get("background_cores")


def runs_table(cells: Sequence[dict[str, Any]]) -> str:
    rows = [
        "| strategy | workload | rate | requests | attainment | misses TTFT / TPOT / failed "
        "| TTFT p50 / p90 ms | TPOT p50 / p90 ms | out tok/s | bg cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        if cell["status"] != "ok":
            continue
        for run in sorted(cell["runs"], key=lambda r: r["rate"]):
            m = run["misses"]
            bg = background(cell, run)
            rows.append(
                f"| {cell['strategy']} | {cell['workload']} | {run['rate']:.2f} | {run['num_requests']} "
                f"| {run['attainment']:.3f} | {m['ttft']} / {m['tpot']} / {m['failed']} "
                f"| {_ms(run['ttft_p50_s'])} / {_ms(run['ttft_p90_s'])} "
                f"| {_ms(run['tpot_p50_s'])} / {_ms(run['tpot_p90_s'])} | {run['output_throughput']:.1f} "
                f"| {'–' if bg is None else f'{bg:.2f}'} |"
            )
    return "\n".join(rows)


def transfers_table(cells: Sequence[dict[str, Any]]) -> str | None:
    """FuDG's KV hand-offs per run (None when no run recorded any)."""
    rows = [
        "| strategy | workload | rate | transfers (refused) | KV / wire MiB | transfer mean / p50 / p90 ms |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for run in sorted(cell.get("runs") or [], key=lambda r: r["rate"]):
            t = run.get("kv_transfers")
            if not t:
                continue
            ms = " / ".join(f"{t[k] * 1000:.1f}" for k in ("seconds_mean", "seconds_p50", "seconds_p90"))
            rows.append(
                f"| {cell['strategy']} | {cell['workload']} | {run['rate']:.2f} "
                f"| {t['count']} ({t['refused']}) "
                f"| {t['kv_bytes'] / 2**20:.1f} / {t['wire_bytes'] / 2**20:.1f} | {ms} |"
            )
    return "\n".join(rows) if len(rows) > 2 else None


def not_run(cells: Sequence[dict[str, Any]]) -> list[str]:
    """One line per cell that did not run (a failure's log tail flattened onto the line)."""
    return [
        f"- {c['strategy']} × {c['workload']}: {c['status']}: {' '.join(str(c['reason']).split())}"
        for c in cells
        if c["status"] != "ok"
    ]


def reading(cells: Sequence[dict[str, Any]], workloads: Sequence[str]) -> list[str]:
    """Numbers-only statements per workload: who has the highest P90 goodput, the bars, and what missed."""
    lines = []
    for workload in workloads:
        ok = [c for c in cells if c["workload"] == workload and c["status"] == "ok"]
        if not ok:
            lines.append(f"- **{workload}**: nothing ran.")
            continue
        ranked = sorted(ok, key=lambda c: -c["goodput"]["p90"])
        order = ", ".join(f"{c['strategy']} {c['goodput']['p90']:.2f}" for c in ranked)
        text = f"- **{workload}**: P90 goodput (req/s) {order}."
        r = ratios(cells, workload, "p90")
        bars = workload in BAR_WORKLOADS
        if r["vs_nodg_family"] is not None:
            text += (
                f" PaDG ÷ best(NoDG, Sarathi) = {_ratio(r['vs_nodg_family'], NODG_BAR if bars else None)}."
            )
        if r["vs_fudg"] is not None:
            text += f" PaDG ÷ FuDG = {_ratio(r['vs_fudg'], FUDG_BAR if bars else None)}."
        for cell in ranked:
            if not monotonic(cell["runs"]):
                points = ", ".join(
                    f"{r['attainment']:.2f} at {r['rate']:.2f}"
                    for r in sorted(cell["runs"], key=lambda r: r["rate"])
                )
                text += f" {cell['strategy']}'s attainment is not monotonic in the rate ({points}): noise."
            failing = [run for run in cell["runs"] if run["attainment"] < LEVELS["p90"]]
            if failing:
                first = min(failing, key=lambda run: run["rate"])
                m = first["misses"]
                text += (
                    f" {cell['strategy']} first missed P90 at {first['rate']:.2f} req/s "
                    f"(attainment {first['attainment']:.2f}; of {first['num_requests']} requests "
                    f"{m['ttft']} over the TTFT SLO, {m['tpot']} over TPOT, {m['failed']} failed)."
                )
        lines.append(text)
    return lines


def preliminary_reasons(document: dict[str, Any]) -> list[str]:
    """Why these numbers are not final: quick mode, contention, strategies that did not run."""
    reasons = []
    if document["setup"].get("quick"):
        reasons.append("quick mode (one workload, a few short runs)")
    contended = []
    for c in document["cells"]:
        if c["status"] == "ok":
            worst = max((background(c, run) or 0.0 for run in c["runs"]), default=0.0)
            if worst > CONTENDED_CORES:
                contended.append(f"{c['strategy']}×{c['workload']} up to {worst:.2f}")
    if contended:
        reasons.append(
            f"other processes used > {CONTENDED_CORES} cores during runs of " + ", ".join(contended)
        )
    missing = sorted({c["strategy"] for c in document["cells"] if c["status"] != "ok"})
    if missing:
        reasons.append("not run: " + ", ".join(missing))
    reasons.extend(document.get("notes", []))
    return reasons


def render_markdown(document: dict[str, Any]) -> str:
    """docs/results.md from the experiment's summary document (see bench/experiment.py for its fields)."""
    setup, machine, cells = document["setup"], document["machine"], document["cells"]
    strategies = setup["strategies"]
    workloads = setup["workloads"]
    out = ["# Results: PaDG against NoDG, Sarathi and FuDG on one machine", ""]
    reasons = preliminary_reasons(document)
    if reasons:
        out += [
            "> **Preliminary — not final numbers.** " + "; ".join(reasons) + ".",
            "",
        ]
    out += [
        f"Generated {document['created']} by `{document['command']}` (commit `{machine.get('commit')}`"
        f"{', dirty tree' if machine.get('dirty') else ''}); reproduce with `{setup['reproduce']}`. Raw "
        f"per-request JSON: `{setup['raw_dir']}` (not committed); summary: `{setup['summary_json']}`.",
        "",
        "## Setup",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB, "
        f"Python {machine['python']}, torch {machine['torch']}. Load average {machine['loadavg_start']} "
        f"at the start, {machine['loadavg_end']} at the end; background cores (CPU used by processes other "
        "than the experiment's, sampled per run) are in the last table.",
        f"- Budget per strategy: `ecoserve up --instances {setup['instances']} --threads-per-instance "
        f"{setup['threads_per_instance']}` ({setup['instances']} instances × {setup['threads_per_instance']} "
        f"torch thread), model `{setup['model']}` ({setup['dtype']}), "
        f"`--max-num-batched-tokens {setup['max_num_batched_tokens']}`; router, coordinator, NATS, Redis and "
        "the benchmark client share the same cores. A fresh cluster per cell, environment "
        + (", ".join(f"`{k}={v}`" for k, v in setup.get("cluster_env", {}).items()) or "unchanged")
        + ".",
        f"- Rate search per cell: `ecoserve bench --search` aiming at P90, first rate per workload below, "
        f"×{setup['search']['factor']} ramp, bisection to {setup['search']['tolerance']:g} relative, at "
        f"most {setup['search']['max_runs']} runs of {setup['search']['duration_s']:g} s of Poisson arrivals "
        f"(seed {setup['search']['seed']}). Coarse on purpose (the budget): a goodput is the highest rate "
        "up to which every rate tried met the level, resolved only to the last bisection's bracket; P50 and "
        "P99 are read off the same runs (≥: no tried rate missed that level; <: even the lowest did).",
        f"- SLOs: the paper's, TTFT ×{setup['slo_scales']['ttft']:g} and TPOT "
        f"×{setup['slo_scales']['tpot']:g} (docs/benchmarks.md explains the scaling); lengths scaled per "
        "workload:",
        "",
        "| workload | lengths in / out (scaled means) | scale | SLO TTFT | SLO TPOT | first rate |",
        "|---|---|---|---|---|---|",
    ]
    for name in workloads:
        w = setup["workload_settings"][name]
        out.append(
            f"| {name} | {w['mean_input']:.0f} / {w['mean_output']:.0f} | {w['scale']:g} "
            f"| {w['slo_ttft']:g} s | {w['slo_tpot'] * 1000:g} ms | {w['start_rate']:g} req/s |"
        )
    out += [
        "",
        "## Goodput (req/s) per strategy",
        "",
        goodput_table(cells, strategies, workloads),
        "",
        "## PaDG's ratios",
        "",
        f"The issue's bar: PaDG's P90 goodput ≥ {NODG_BAR:g}× the better of NoDG and Sarathi and "
        f"≥ {FUDG_BAR:g}× FuDG on the ShareGPT and LongBench shapes.",
        "",
        ratio_table(cells, workloads),
        "",
        "## Attainment curves",
        "",
    ]
    for name in workloads:
        plot = document["plots"].get(f"attainment-{name}")
        if plot:
            out.append(f"![attainment vs rate, {name}]({plot})")
            out.append("")
    timeline = document["plots"].get("phases")
    out += ["## Phase timeline", ""]
    if timeline:
        out += [f"{document['plots'].get('phases_caption', '')}", "", f"![phase timeline]({timeline})", ""]
    else:
        out += ["No timeline was recorded.", ""]
    out += ["## Reading", "", *reading(cells, workloads), ""]
    if document.get("discussion"):
        out += [document["discussion"], ""]
    skipped = not_run(cells)
    if skipped:
        out += ["## Not run", "", *skipped, ""]
    out += ["## Every run", "", runs_table(cells), ""]
    transfers = transfers_table(cells)
    if transfers:
        out += [
            "## FuDG KV transfers",
            "",
            "Measured by the prefill instances (first chunk sent → the "
            "decode instance's ack, which includes its import), per run.",
            "",
            transfers,
            "",
        ]
    return "\n".join(out)
