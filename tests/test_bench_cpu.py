"""CPU accounting for benchmarks: a watched process tree's CPU is attributed to it (children included, and
kept after it exits), the rest of the machine's busy time is background."""

from __future__ import annotations

import subprocess
import sys
import time

from services.bench.cpu import CpuSampler

# A parent that spins in a child for ~0.8 s of wall time, then exits.
BURN = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', "
    "'import time\\nend = time.time() + 0.8\\nwhile time.time() < end: pass'])"
)


def test_sampler_attributes_a_process_tree_and_keeps_it_after_exit():
    sampler = CpuSampler(interval=0.1).start()
    began = time.time()
    burner = subprocess.Popen([sys.executable, "-c", BURN])
    sampler.watch("burner", burner.pid)
    burner.wait()
    time.sleep(0.3)  # samples after the exit must not lose the tree's CPU
    sampler.stop()
    window = sampler.window(began, time.time())
    assert window is not None
    assert window["burner_cores"] > 0.1  # the grandchild's spinning counted (any share of a core on CI)
    assert window["background_cores"] >= 0.0 and window["machine_cores"] >= window["burner_cores"] - 0.05
    after = sampler.window(sampler.samples[-2].time, sampler.samples[-1].time)
    assert after is not None and after["burner_cores"] == 0.0  # exited: flat, never negative
    assert sampler.window(0.0, 0.0) is None  # before the first sample: unknown
