"""The EcoServe comparison on one machine budget: PaDG, NoDG, Sarathi and FuDG on Alpaca-, ShareGPT- and
LongBench-shaped workloads, written up as docs/results.md with plots under docs/results/.

    .venv/bin/python bench/experiment.py          # everything (35–40 min on the 2-core box) = make experiment
    .venv/bin/python bench/experiment.py --quick  # smoke: ShareGPT only, 2 short runs per strategy
    .venv/bin/python bench/experiment.py --strategies nodg sarathi --workloads sharegpt
    .venv/bin/python bench/experiment.py --rerender docs/results/results.json --discussion notes.md

For every (strategy, workload) cell, in one process tree of its own:
1. `ecoserve up --strategy S --instances N --threads-per-instance 1` on a free port with a fresh prefix (and
   its own embedded NATS and Redis); `--ttft-slo/--tpot-slo` with the workload's SLOs when the launcher has
   them. A strategy the launcher does not offer, or refuses (usage error), is recorded as "not run: <reason>".
2. Ready = the launcher's "up" line, then a status report in state `ready` from each of the N instances.
3. `ecoserve bench --search` (P90, the workload's SLOs, `--nats` for the phase timeline) as a subprocess.
4. SIGINT to the launcher (it drains and stops everything), then the next cell.
Every run records the cores other processes used while it ran (machine busy time minus the cluster's and the
client's own CPU, services/bench/cpu.py): on 2 shared cores a busy neighbour swamps what is being measured.

Outputs: `--raw-dir` (default bench/results/experiment/, not committed) holds each cell's full bench JSON and
logs; `--out-dir` (default docs/results/) the summary JSON and the PNGs; `--markdown` (default
docs/results.md) the write-up (services/bench/results.py), with a "preliminary" banner whenever the run was
quick, contended or incomplete.

Scaling. SmolLM2-135M (bf16) at one torch thread prefills ~600 tokens/s and takes ~60 ms per decode step at
batch 1 (~70–80 ms at a few sequences). The workloads keep the default length scales of
services/bench/workloads.py (ShareGPT ×0.25 ≈ 86 in / 59 out, LongBench ×0.125 ≈ 336 / 13, Alpaca ×0.25 ≈
5 / 41) and the paper's TTFT SLOs (1 / 5 / 15 s: 15–35× one prompt's prefill, as on the paper's GPUs). The
TPOT SLO is doubled to 200 ms: the paper's 100 ms is ~3–4× a 30B model's decode step on its GPUs, but only
~1.7× this CPU's, which would leave no room for any prefill at all. At 200 ms one ShareGPT prefill (~150 ms)
inside a decode step is what breaks the SLO, i.e. prefill and decode interfere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.bench import results  # noqa: E402
from services.bench.cpu import CpuSampler, busy_seconds  # noqa: E402
from services.bench.workloads import DATASETS, load_workload  # noqa: E402
from services.infra.embedded import free_port  # noqa: E402

PYTHON = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
START_RATES = {"alpaca": 2.0, "sharegpt": 1.0, "longbench": 0.5}  # req/s: near the 2-instance limit


# ---- machine facts and CPU accounting ----------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unavailable"


def machine_facts() -> dict[str, Any]:
    import psutil
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": loadavg(),
    }


def wait_quiet(below: float, patience: float) -> float:
    """Wait up to `patience` s for the machine to be busy less than `below` cores; the last reading."""
    waited = 0.0
    while True:
        start = busy_seconds()
        time.sleep(1.0)
        seen = busy_seconds() - start
        if seen < below or waited >= patience:
            return seen
        waited += 1.0


# ---- the launcher ------------------------------------------------------------------------------------------


@dataclass
class Launcher:
    """What this checkout's `ecoserve up` offers, read from its --help."""

    strategies: list[str]
    flags: set[str]

    @classmethod
    def probe(cls) -> Launcher:
        done = subprocess.run(
            [PYTHON, "-m", "services.cli", "up", "--help"],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        text = " ".join(done.stdout.split())  # argparse wraps long choice lists
        choices = re.search(r"--strategy \{([^}]*)\}", text)
        return cls(
            strategies=[s.strip() for s in choices.group(1).split(",")] if choices else [],
            flags=set(re.findall(r"(--[a-z][a-z0-9-]*)", text)),
        )


@dataclass
class Cell:
    strategy: str
    workload: str
    raw_dir: Path

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.workload}"


class ClusterError(RuntimeError):
    pass


class NotOffered(ClusterError):
    """The launcher refused the arguments (exit 2): a strategy it lists but has not wired, for example."""


def up_argv(args: argparse.Namespace, launcher: Launcher, cell: Cell, port: int, prefix: str) -> list[str]:
    shape = DATASETS[cell.workload]
    argv = [
        PYTHON,
        "-m",
        "services.cli",
        "up",
        "--strategy",
        cell.strategy,
        "--instances",
        str(args.instances),
    ]
    argv += ["--threads-per-instance", str(args.threads_per_instance), "--dtype", args.dtype]
    argv += ["--port", str(port), "--prefix", prefix, "--ready-timeout", str(args.ready_timeout)]
    argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.model:
        argv += ["--model", args.model]
    if cell.strategy == "fudg" and "--fudg-split" in launcher.flags:
        # DistServe-style: half the instances prefill (rounded up), the rest decode; 1:1 for 2 instances.
        argv += ["--fudg-split", f"{-(-args.instances // 2)}:{args.instances // 2}"]
    if args.pin_cores:
        argv += ["--pin-cores"]
    if {"--ttft-slo", "--tpot-slo"} <= launcher.flags:  # PaDG's admission check needs the SLOs
        argv += [
            "--ttft-slo",
            str(shape.slo_ttft * args.ttft_slo_scale),
            "--tpot-slo",
            str(shape.slo_tpot * args.tpot_slo_scale),
        ]
    return argv


def cluster_env(args: argparse.Namespace) -> dict[str, str]:
    """PaDG's coordinator settings the launcher has no flags for, through their ECOSERVE_* variables."""
    return {
        "ECOSERVE_PADG_VARIANT": args.padg_variant,
        "ECOSERVE_HOLD_OUTPUTS": "1" if args.hold_outputs else "0",
    }


def start_cluster(
    argv: list[str], env: dict[str, str], log_path: Path, timeout: float
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start `ecoserve up`; its URLs once it prints them (the router is healthy), or ClusterError."""
    log = log_path.open("w")
    process = subprocess.Popen(
        argv, cwd=REPO, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=log, text=True
    )
    log.close()
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()  # the launcher exits (EOF) on its own --ready-timeout
        if not line:
            break
        if line.startswith("{"):
            return process, json.loads(line)
    stop_cluster(process)
    tail = log_path.read_text()[-1500:]
    if process.returncode == 2:  # a usage error, before anything started
        raise NotOffered(f"`ecoserve up` refused it: {' '.join(tail.split())}")
    raise ClusterError(f"ecoserve up did not come up (exit {process.returncode}): …{tail}")


async def _wait_instances(nats_url: str, prefix: str, count: int, timeout: float) -> set[str]:
    from services.bench.phases import PhaseRecorder

    async with PhaseRecorder(nats_url, prefix) as recorder:
        deadline = time.monotonic() + timeout
        while len(recorder.book.ready()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return recorder.book.ready()


def wait_instances(urls: dict[str, str], prefix: str, count: int, timeout: float) -> None:
    ready = asyncio.run(_wait_instances(urls["nats_url"], prefix, count, timeout))
    if len(ready) < count:
        raise ClusterError(f"only {len(ready)} of {count} instances reported ready: {sorted(ready)}")


def stop_cluster(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # the launcher drains instances, then stops NATS and Redis
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


# ---- one cell ----------------------------------------------------------------------------------------------


def bench_argv(args: argparse.Namespace, cell: Cell, urls: dict[str, str], prefix: str) -> list[str]:
    shape = DATASETS[cell.workload]
    argv = [PYTHON, "-m", "services.cli", "bench", "--url", urls["url"], "--workload", cell.workload]
    argv += ["--search", "--attainment", "0.9", "--search-start", str(start_rate(args, cell.workload))]
    argv += ["--search-factor", str(args.search_factor), "--search-tolerance", str(args.search_tolerance)]
    argv += ["--max-runs", str(args.max_runs), "--duration", str(args.duration), "--seed", str(args.seed)]
    argv += ["--min-requests", str(args.min_requests), "--request-timeout", str(args.request_timeout)]
    argv += [
        "--slo-ttft",
        str(shape.slo_ttft * args.ttft_slo_scale),
        "--slo-tpot",
        str(shape.slo_tpot * args.tpot_slo_scale),
    ]
    argv += ["--nats", urls["nats_url"], "--prefix", prefix, "--no-progress"]
    argv += ["--json", str(cell.raw_dir / f"{cell.name}.json"), "--plot-dir", str(cell.raw_dir / cell.name)]
    if args.scale is not None:
        argv += ["--scale", str(args.scale)]
    return argv


def start_rate(args: argparse.Namespace, workload: str) -> float:
    return args.start_rate or START_RATES[workload]


def run_cell(args: argparse.Namespace, launcher: Launcher, cell: Cell) -> dict[str, Any]:
    if cell.strategy not in launcher.strategies:
        offered = ", ".join(launcher.strategies) or "nothing"
        reason = f"`ecoserve up --strategy` does not offer {cell.strategy} yet (it offers {offered})"
        return results.skipped_cell(cell.strategy, cell.workload, "not run", reason)
    quiet = wait_quiet(args.quiet_below, args.quiet_wait)
    prefix = f"exp{uuid.uuid4().hex[:8]}"
    argv = up_argv(args, launcher, cell, free_port(), prefix)
    print(f"[{cell.name}] {shlex.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        log_path = cell.raw_dir / f"{cell.name}-up.log"
        process, urls = start_cluster(argv, cluster_env(args), log_path, args.ready_timeout + 30)
    except NotOffered as exc:
        return results.skipped_cell(cell.strategy, cell.workload, "not run", str(exc))
    except ClusterError as exc:
        return results.skipped_cell(cell.strategy, cell.workload, "failed", str(exc))
    try:
        wait_instances(urls, prefix, args.instances, args.ready_timeout)
        startup = time.monotonic() - started
        bench = bench_argv(args, cell, urls, prefix)
        sampler = CpuSampler()
        sampler.watch("cluster", process.pid)  # before start: its start-up CPU is not the benchmark's
        sampler.start()
        began = time.time()
        with (cell.raw_dir / f"{cell.name}-bench.log").open("w") as log:
            client = subprocess.Popen(bench, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
            sampler.watch("client", client.pid)
            returncode = client.wait()
        sampler.stop()
        background = sampler.window(began, time.time()) or {}
    except ClusterError as exc:
        return results.skipped_cell(cell.strategy, cell.workload, "failed", str(exc))
    finally:
        stop_cluster(process)
    report_path = cell.raw_dir / f"{cell.name}.json"
    if returncode != 0 or not report_path.exists():
        tail = (cell.raw_dir / f"{cell.name}-bench.log").read_text()[-1500:]
        return results.skipped_cell(
            cell.strategy, cell.workload, "failed", f"bench exit {returncode}: …{tail}"
        )
    report = json.loads(report_path.read_text())
    background["background_cores_before"] = quiet
    summary = results.cell_from_report(
        cell.strategy,
        cell.workload,
        report,
        background=background,
        startup_s=startup,
        up_argv=argv[1:],
        bench_argv=bench[1:],
        report_path=str(report_path.relative_to(REPO) if report_path.is_relative_to(REPO) else report_path),
    )
    summary["timeline"] = goodput_timeline(report)
    for run, raw in zip(summary["runs"], report["runs"], strict=True):
        run["cpu"] = sampler.window(raw["started_at"], raw["started_at"] + raw["duration_s"])
    print(
        f"[{cell.name}] P90 goodput {summary['goodput']['p90']:.2f} req/s over {len(summary['runs'])} runs, "
        f"bg {background.get('background_cores', float('nan')):.2f} cores",
        file=sys.stderr,
        flush=True,
    )
    return summary


def goodput_timeline(report: dict[str, Any]) -> dict[str, Any] | None:
    """The phase records of the run at the goodput (else the last run), for the timeline plot."""
    runs = report["runs"]
    shown = [r for r in runs if r["rate"] == report.get("goodput_rps")] or runs[-1:]
    if not shown or not shown[-1].get("phases"):
        return None
    run = shown[-1]
    return {"rate": run["rate"], "duration_s": run["duration_s"], "records": run["phases"]}


# ---- outputs -----------------------------------------------------------------------------------------------


def write_plots(document: dict[str, Any], out_dir: Path, markdown: Path) -> dict[str, str]:
    from services.bench.plots import plot_attainment_curves, plot_phases

    cells = document["cells"]
    plots: dict[str, str] = {}

    def link(path: Path) -> str:
        return os.path.relpath(path, markdown.parent)

    for workload in document["setup"]["workloads"]:
        curves = {
            c["strategy"]: [(r["rate"], r["attainment"]) for r in c["runs"]]
            for c in cells
            if c["workload"] == workload and c["status"] == "ok"
        }
        if curves:
            path = plot_attainment_curves(
                curves,
                list(results.LEVELS.values()),
                out_dir / f"attainment-{workload}.png",
                title=f"{workload}: attainment vs rate",
            )
            plots[f"attainment-{workload}"] = link(path)
    # PaDG on ShareGPT if it ran; otherwise whatever ran first, labelled as such.
    order = [("padg", w) for w in ("sharegpt", *document["setup"]["workloads"])]
    order += [(c["strategy"], c["workload"]) for c in cells]
    for strategy, workload in order:
        cell = results.find(cells, strategy, workload)
        if cell and cell["status"] == "ok" and cell.get("timeline"):
            timeline = cell["timeline"]
            records = [(r["t"], r["instance"], r["phase"], r["prefill_window"]) for r in timeline["records"]]
            title = f"{strategy} on {workload} at {timeline['rate']:.2f} req/s"
            path = plot_phases(records, out_dir / "phases.png", end=timeline["duration_s"], title=title)
            plots["phases"] = link(path)
            caption = f"Each instance's phase during the {title} run (its goodput run)."
            if strategy != "padg":
                caption += " PaDG did not run, so this is not the picture of rolling activation."
            else:
                caption += " The golden band marks the instance holding the prefill window."
            plots["phases_caption"] = caption
            break
    return plots


def workload_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    settings = {}
    for name in args.workloads:
        shape = DATASETS[name]
        workload = load_workload(name, input_scale=args.scale, output_scale=args.scale, seed=args.seed)
        described = workload.describe()
        settings[name] = {
            "scale": described["input_scale"],
            "mean_input": described["input"]["mean"],
            "mean_output": described["output"]["mean"],
            "slo_ttft": shape.slo_ttft * args.ttft_slo_scale,
            "slo_tpot": shape.slo_tpot * args.tpot_slo_scale,
            "start_rate": start_rate(args, name),
        }
    return settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=list(results.STRATEGIES), choices=results.STRATEGIES)
    p.add_argument("--workloads", nargs="+", default=list(results.WORKLOADS), choices=results.WORKLOADS)
    p.add_argument("--quick", action="store_true", help="smoke test: sharegpt only, 2 runs of 4 s")
    p.add_argument("--model", help="model folder (default: ecoserve's default SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--instances", type=int, default=2, help="instances per cluster (the machine budget)")
    p.add_argument("--threads-per-instance", type=int, default=1)
    p.add_argument("--pin-cores", action="store_true", help="pin each instance to its own core")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--padg-variant", choices=["paper", "authors"], default="paper", help="admission check")
    p.add_argument("--hold-outputs", action="store_true", help="PaDG instances hold tokens in their window")
    p.add_argument("--scale", type=float, help="length scale for every workload (default: workloads.py's)")
    p.add_argument("--ttft-slo-scale", type=float, default=1.0, help="multiply the paper's TTFT SLOs")
    p.add_argument(
        "--tpot-slo-scale",
        type=float,
        default=2.0,
        help="multiply the paper's TPOT SLO (100 ms; see Scaling)",
    )
    p.add_argument("--start-rate", type=float, help="first rate of every search (default per workload)")
    p.add_argument("--search-factor", type=float, default=2.0)
    p.add_argument("--search-tolerance", type=float, default=0.2)
    p.add_argument("--max-runs", type=int, default=4)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per run")
    p.add_argument("--min-requests", type=int, default=10)
    p.add_argument("--request-timeout", type=float, default=90.0, help="a request slower than this fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--quiet-below", type=float, default=0.3, help="wait for background load below this")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="… for at most this many seconds")
    p.add_argument("--raw-dir", type=Path, default=REPO / "bench" / "results" / "experiment")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--markdown", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--note", action="append", default=[], help="a line for the results' banner (repeatable)")
    p.add_argument("--rerender", type=Path, help="only rewrite the outputs from this summary JSON")
    p.add_argument(
        "--discussion",
        type=Path,
        help="markdown file included under Reading (the interpretation of a final run)",
    )
    return p


def apply_quick(args: argparse.Namespace) -> None:
    if not args.quick:
        return
    if args.workloads == list(results.WORKLOADS):
        args.workloads = ["sharegpt"]
    args.max_runs, args.duration, args.min_requests = min(args.max_runs, 2), min(args.duration, 4.0), 4
    args.quiet_wait = 0.0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rerender:
        return rerender(args)
    apply_quick(args)
    discussion = args.discussion.read_text().strip() if args.discussion else None  # fails before the run
    raw_dir = args.raw_dir.resolve()
    raw_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_facts()
    launcher = Launcher.probe()
    command = shlex.join(["bench/experiment.py", *(sys.argv[1:] if argv is None else argv)])
    cells = []
    for workload in args.workloads:
        for strategy in args.strategies:
            cells.append(run_cell(args, launcher, Cell(strategy, workload, raw_dir)))
    machine["loadavg_end"] = loadavg()
    document: dict[str, Any] = {
        "schema": results.SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "launcher": {"strategies": launcher.strategies, "slo_flags": "--ttft-slo" in launcher.flags},
        "setup": {
            "quick": args.quick,
            "strategies": args.strategies,
            "workloads": args.workloads,
            "model": args.model or "SmolLM2-135M-Instruct (ecoserve's default)",
            "dtype": args.dtype,
            "instances": args.instances,
            "threads_per_instance": args.threads_per_instance,
            "pin_cores": args.pin_cores,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "cluster_env": cluster_env(args),
            "search": {
                "target": 0.9,
                "factor": args.search_factor,
                "tolerance": args.search_tolerance,
                "max_runs": args.max_runs,
                "duration_s": args.duration,
                "min_requests": args.min_requests,
                "request_timeout_s": args.request_timeout,
                "seed": args.seed,
            },
            "slo_scales": {"ttft": args.ttft_slo_scale, "tpot": args.tpot_slo_scale},
            "workload_settings": workload_settings(args),
            "reproduce": "make experiment" if not argv and not sys.argv[1:] else command,
            "raw_dir": os.path.relpath(raw_dir, REPO),
            "summary_json": os.path.relpath(args.out_dir.resolve() / "results.json", REPO),
        },
        "notes": args.note,
        "discussion": discussion,
        "cells": cells,
    }
    return write_outputs(document, args)


def write_outputs(document: dict[str, Any], args: argparse.Namespace) -> int:
    """Plots, the summary JSON and the markdown; the tables on stdout."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    document["plots"] = write_plots(document, args.out_dir, args.markdown)
    results_json = args.out_dir / "results.json"
    results_json.write_text(json.dumps(document, indent=1) + "\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(results.render_markdown(document))
    cells, setup = document["cells"], document["setup"]
    print(results.goodput_table(cells, setup["strategies"], setup["workloads"]))
    print()
    print(results.ratio_table(cells, setup["workloads"]))
    print(f"\nwrote {args.markdown}, {results_json} and plots in {args.out_dir}", file=sys.stderr)
    return 0 if any(c["status"] == "ok" for c in cells) else 1


def rerender(args: argparse.Namespace) -> int:
    """Outputs again from a summary JSON (after writing a --discussion), without running anything."""
    document = json.loads(args.rerender.read_text())
    document["setup"]["summary_json"] = os.path.relpath(args.out_dir.resolve() / "results.json", REPO)
    for cell in document["cells"]:
        if cell["status"] == "ok":
            cell.update(results.score(cell["runs"]))
    if args.discussion:
        document["discussion"] = args.discussion.read_text().strip()
    if args.note:
        document["notes"] = args.note
    return write_outputs(document, args)


if __name__ == "__main__":
    sys.exit(main())
