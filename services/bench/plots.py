"""PNG plots of a benchmark: attainment against rate, per-request latencies against time, and instances'
phases over time (the picture of rolling activation: one instance at a time holding the prefill window).

matplotlib's object API with the Agg canvas, never pyplot: no global figure state and no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from services.bench.metrics import SLO

PHASE_COLORS = {
    "prefill": "tab:red",
    "decode": "tab:blue",
    "mixed": "tab:purple",
    "idle": "lightgray",
    "draining": "tab:orange",
}
EXTRA_COLORS = ("tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def plot_attainment(
    points: Sequence[tuple[float, float]],
    target: float,
    path: str | Path,
    *,
    goodput: float | None = None,
    title: str = "SLO attainment vs request rate",
) -> Path:
    """Each run's (rate, attainment), the target line, and the goodput when a search found one."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ordered = sorted(points)
    ax.plot([r for r, _ in ordered], [a for _, a in ordered], "-", color="tab:blue", alpha=0.4)
    for rate, att in points:
        ax.plot(rate, att, "o", color="tab:green" if att >= target else "tab:red")
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    if goodput:
        ax.axvline(goodput, color="tab:green", linestyle=":", label=f"goodput {goodput:.3g} req/s")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("share of requests meeting TTFT and TPOT SLOs")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_latencies(records: Sequence[dict[str, Any]], slo: SLO, path: str | Path, *, title: str = "") -> Path:
    """TTFT and TPOT of every request against its send time, with the SLOs; failures marked on the axis."""
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, key, limit, label in ((top, "ttft_s", slo.ttft, "TTFT"), (bottom, "tpot_s", slo.tpot, "TPOT")):
        ok = [r for r in records if r.get(key) is not None]
        colors = ["tab:green" if r["meets_slo"] else "tab:red" for r in ok]
        ax.scatter([r["sent_s"] for r in ok], [r[key] * 1000 for r in ok], s=10, c=colors)
        failed = [r["sent_s"] for r in records if not r["success"]]
        if failed:
            ax.scatter(failed, [0] * len(failed), marker="x", color="black", label="failed")
            ax.legend(loc="upper left")
        ax.axhline(limit * 1000, color="black", linestyle="--", linewidth=1)
        ax.set_ylabel(f"{label} (ms; SLO {limit * 1000:g})")
        ax.grid(alpha=0.3)
    bottom.set_xlabel("send time (s from the run's start)")
    top.set_title(title or "per-request latency (green: meets both SLOs)")
    return _save(fig, path)


def plot_phases(
    timeline: Sequence[tuple[float, str, str]], path: str | Path, *, end: float | None = None
) -> Path:
    """Each instance's phase over time, one row per instance.

    `timeline` holds (time, instance_id, phase) records: a phase starts at its record's time and lasts until
    the instance's next record (the last one until `end`, default the latest time in the timeline).
    """
    if not timeline:
        raise ValueError("no phase records to plot")
    records = sorted(timeline)
    end = max(t for t, _, _ in records) if end is None else end
    instances = sorted({instance for _, instance, _ in records})
    phases = list(dict.fromkeys(phase for _, _, phase in records))
    extra = iter(EXTRA_COLORS * (1 + len(phases) // len(EXTRA_COLORS)))
    colors = {p: PHASE_COLORS.get(p) or next(extra) for p in phases}
    fig = Figure(figsize=(8.0, 1.0 + 0.5 * len(instances)), layout="constrained")
    ax = fig.add_subplot()
    for row, instance in enumerate(instances):
        own = [(t, p) for t, i, p in records if i == instance]
        for (start, phase), (stop, _) in zip(own, [*own[1:], (end, "")], strict=True):
            if stop > start:
                ax.broken_barh([(start, stop - start)], (row - 0.4, 0.8), facecolors=colors[phase])
    ax.set_yticks(range(len(instances)), instances)
    ax.invert_yaxis()  # first instance on top
    ax.set_xlabel("time (s)")
    ax.set_xlim(min(t for t, _, _ in records), end)
    ax.set_title("instance phases over time")
    handles = [Patch(color=colors[p], label=p) for p in phases]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(phases))
    return _save(fig, path)
