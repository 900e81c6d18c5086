"""Who used the CPU while a benchmark ran: the server under test, the benchmark client, everybody else.

On the shared 2-core box one busy neighbour halves what an instance gets, so every number must say how much
of the machine other processes took while it was measured. A `CpuSampler` thread reads, every `interval`
seconds, the machine's busy time (/proc/stat through psutil) and the cumulative CPU time of the process
trees it watches; `window(t0, t1)` turns two samples into cores: ours (the watched trees) and background
(machine minus ours, clamped at 0 because the two clocks differ in granularity by ~10 ms). A process that
exits keeps its last reading, so its CPU does not vanish from later windows.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from dataclasses import dataclass

import psutil


def busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


@dataclass(frozen=True)
class Sample:
    time: float  # unix seconds
    busy: float  # machine-wide busy CPU seconds
    own: dict[str, float]  # watched name → cumulative CPU seconds of its process tree


class CpuSampler:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[Sample] = []
        self._roots: dict[str, int] = {}
        self._members: dict[str, set[int]] = {}  # every pid ever seen in a watched tree
        self._seen: dict[int, float] = {}  # pid → last CPU seconds read (kept after the process exits)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        """Count `pid` and its descendants as `name` from the next sample on. A window starting before that
        sample counts the tree's whole CPU time so far: watch a process that already ran before `start()`,
        and one started later (whose CPU so far is ~0) as soon as it exists."""
        with self._lock:
            self._roots[name] = pid

    def start(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _tree(self, pid: int) -> list[int]:
        try:
            root = psutil.Process(pid)
            return [pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.Error:
            return [pid]

    def sample(self) -> None:
        with self._lock:
            roots = dict(self._roots)
        own: dict[str, float] = {}
        for name, root in roots.items():
            members = self._members.setdefault(name, set())
            members.update(self._tree(root))
            for pid in members:
                with contextlib.suppress(psutil.Error):
                    t = psutil.Process(pid).cpu_times()
                    self._seen[pid] = t.user + t.system
            own[name] = sum(self._seen.get(pid, 0.0) for pid in members)
        sample = Sample(time.time(), busy_seconds(), own)
        with self._lock:
            self.samples.append(sample)

    def window(self, t0: float, t1: float) -> dict[str, float] | None:
        """Cores used from the last sample at or before t0 to the first at or after t1 (None: no samples)."""
        with self._lock:
            samples = list(self.samples)
        times = [s.time for s in samples]
        i = max(0, bisect.bisect_right(times, t0) - 1)
        j = min(len(samples) - 1, bisect.bisect_left(times, t1))
        if j <= i:
            return None
        a, b = samples[i], samples[j]
        wall = b.time - a.time
        cores = {name: (b.own.get(name, 0.0) - a.own.get(name, 0.0)) / wall for name in b.own}
        machine = (b.busy - a.busy) / wall
        return {
            "wall_s": wall,
            **{f"{name}_cores": value for name, value in cores.items()},
            "machine_cores": machine,
            "background_cores": max(0.0, machine - sum(cores.values())),
        }
