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


PhaseRecord = tuple[float, str, str] | tuple[float, str, str, bool | None]
WINDOW_COLOR = "goldenrod"  # not black: axes and text are black


def plot_phases(
    timeline: Sequence[PhaseRecord], path: str | Path, *, end: float | None = None, title: str = ""
) -> Path:
    """Each instance's phase over time, one row per instance, and its PaDG prefill window above it.

    `timeline` holds (time, instance_id, phase[, prefill_window]) records: a state starts at its record's time
    and lasts until the instance's next record (the last one until `end`, default the latest time in the
    timeline). The phase (what the engine's steps did) fills the lower part of a row; where a record says
    the coordinator had the instance's prefill window open, a golden band runs along the top of the row, so
    rolling activation shows as bands handed from row to row. Records whose window is None (policies
    without windows) draw the phase alone.
    """
    if not timeline:
        raise ValueError("no phase records to plot")
    records = sorted(
        ((r[0], r[1], r[2], r[3] if len(r) > 3 else None) for r in timeline), key=lambda r: (r[0], r[1])
    )
    end = max(r[0] for r in records) if end is None else end
    instances = sorted({r[1] for r in records})
    phases = list(dict.fromkeys(r[2] for r in records))
    extra = iter(EXTRA_COLORS * (1 + len(phases) // len(EXTRA_COLORS)))
    colors = {p: PHASE_COLORS.get(p) or next(extra) for p in phases}
    windows = any(r[3] is not None for r in records)
    fig = Figure(figsize=(8.0, 1.0 + 0.5 * len(instances)), layout="constrained")
    ax = fig.add_subplot()
    for row, instance in enumerate(instances):
        own = [(t, p, w) for t, i, p, w in records if i == instance]
        for (start, phase, window), (stop, _, _) in zip(own, [*own[1:], (end, "", None)], strict=True):
            if stop <= start:
                continue
            if windows:  # phase in the lower part, window band on top
                ax.broken_barh([(start, stop - start)], (row - 0.15, 0.55), facecolors=colors[phase])
                if window:
                    ax.broken_barh([(start, stop - start)], (row - 0.4, 0.2), facecolors=WINDOW_COLOR)
            else:
                ax.broken_barh([(start, stop - start)], (row - 0.4, 0.8), facecolors=colors[phase])
    ax.set_yticks(range(len(instances)), instances)
    ax.invert_yaxis()  # first instance on top
    ax.set_xlabel("time (s)")
    ax.set_xlim(min(r[0] for r in records), end)
    ax.set_title(title or "instance phases over time")
    handles = [Patch(color=colors[p], label=p) for p in phases]
    if windows:
        handles.append(Patch(color=WINDOW_COLOR, label="prefill window open"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    return _save(fig, path)


def plot_attainment_curves(
    curves: dict[str, Sequence[tuple[float, float]]],
    targets: Sequence[float],
    path: str | Path,
    *,
    title: str = "SLO attainment vs request rate",
) -> Path:
    """Several servers' (rate, attainment) points on one axis (one line each), with the target levels."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    styles = ("o-", "s--", "^:", "D-.", "v-", "P--")  # distinct shapes: equal curves would hide each other
    for index, (label, points) in enumerate(curves.items()):
        ordered = sorted(points)
        style = styles[index % len(styles)]
        ax.plot(
            [r for r, _ in ordered], [a for _, a in ordered], style, color=f"C{index}", label=label, alpha=0.8
        )
    for target in targets:
        ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("share of requests meeting TTFT and TPOT SLOs")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left")
    return _save(fig, path)
