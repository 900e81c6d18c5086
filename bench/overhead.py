"""Serving overhead: the same workload through the HTTP router + NATS and through the engine driven directly
in-process, in one run, to report (a) the ratio of output tok/s and (b) the TTFT the serving path adds.

Bar (from the issue): the HTTP+NATS path keeps >= 95 % of the in-process engine's output throughput and adds
<= 2 ms median TTFT on loopback.

Paths (same model, dtype, torch threads and engine settings; the settings are those `ecoserve up` gives an
instance, read back from the instance's own argv so both paths are configured identically by construction):
  inproc  `AsyncEngine` over `LLMEngine.from_pretrained(...)` in this process (its engine thread plus this
          event loop, as in the instance); TTFT = submit (`add_request`) to the first output with tokens.
  served  embedded nats-server and redis-server, then a coordinator, ONE instance and a router as child
          processes (the argv and environment `ecoserve up` uses, from services.launcher); requests go to
          `/v1/completions` with `stream: true`, `stream_options.include_usage`, `ignore_eos`, `temperature 0`
          over aiohttp; TTFT = send to the first SSE chunk with non-empty `choices` (vLLM's definition);
          output tokens from the usage chunk.
Throughput = generated tokens / wall time (first arrival to last completion).

Scenarios:
  throughput  --requests (32) token-id prompts of --prompt-len (32..256) tokens and --new-tokens (64..128)
              new tokens, seeded; all at once (--rate inf) or Poisson at --rate req/s, at the same arrival
              times on both paths; --repeats runs per path, alternating which path goes first.
  latency     --latency-repeats (30) sequential single requests (short prompt, 8..16 new tokens), each sent
              on both paths back to back (alternating which goes first), so background load hits both alike;
              the added TTFT is the per-pair difference served - inproc (median and p90).

  breakdown   after the latency pairs, a separate pass of the same sequential requests with a passive NATS
              subscriber, splitting the served TTFT into hops (HTTP in, router, coordinator, instance,
              engine, publish, HTTP out).

Threads: the instance and the in-process engine use --threads torch threads (default 1). On the 2-core
benchmark box that leaves the other core to the router, coordinator, NATS, Redis and this client, which is
how `ecoserve up --threads-per-instance 1` would run; --threads 2 puts the engine on both cores and makes it
compete with the services. --pin-cores (auto, on, off; default auto, as `ecoserve up`) places the cluster as
`ecoserve up` does: the instance on cores of its own, NATS, Redis, the coordinator and the router on the rest;
the in-process runs then use the instance's cores, and this client the rest during served runs.

CPU: every run records the cores used by each process of ours (this process = client + in-process engine,
and each service; the event loop thread separately from the engine thread), by every other process on the
machine (busy time minus ours), and /proc/loadavg; output tokens per CPU second give the serving path's CPU
cost. Before each run the script waits (up to --quiet-wait s) for other processes to use < --quiet-below
cores, since one busy neighbour on 2 cores swamps a 5 % effect.

    .venv/bin/python bench/overhead.py                       # both models, both scenarios, 1 thread
    .venv/bin/python bench/overhead.py --models tiny --quick # smoke run
    .venv/bin/python bench/overhead.py --pin-cores off --json bench/results/overhead-unpinned.json
    .venv/bin/python bench/overhead.py --threads 2 --json bench/results/overhead-2t.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    import aiohttp
    import psutil

    from services.instance.engine.async_engine import AsyncEngine
    from services.launcher import Cluster

DEFAULT_JSON = REPO / "bench" / "results" / "overhead.json"
MODEL_DEFAULT_DTYPE = {"smollm2": "bf16", "tiny": "fp32"}
THROUGHPUT_BAR = 0.95  # served / in-process output tok/s
TTFT_BAR_MS = 2.0  # added median TTFT
# Background CPU use (cores, by other processes) above which a run is flagged as unreliable.
BACKGROUND_WARN_CORES = 0.2
READY_TIMEOUT = 300.0


# -- small helpers -------------------------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isnan(seconds) else seconds * 1000


def git_info() -> dict[str, Any]:
    # GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing (writing) the index: this only reads.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=20, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def versions() -> dict[str, str | None]:
    import aiohttp
    import msgpack
    import nats
    import torch
    import transformers

    from services.infra.embedded import find_binary

    def binary_version(name: str) -> str | None:
        try:
            out = subprocess.run([find_binary(name), "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError, RuntimeError):
            return None
        return out.stdout.strip() or None

    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "aiohttp": aiohttp.__version__,
        "nats-py": getattr(nats, "__version__", None) or _dist_version("nats-py"),
        "msgpack": ".".join(map(str, msgpack.version)),
        "uvloop": uvloop_version,
        "nats-server": binary_version("nats-server"),
        "redis-server": binary_version("redis-server"),
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


class CpuMeter:
    """Cores used while one run lasts (CPU seconds / wall seconds): by each process of ours, by every other
    process on the machine (machine busy time minus ours) and stolen by the hypervisor. The load average
    can't tell other people's work from ours, and on 2 cores it decides whether a run means anything."""

    def __init__(self, processes: dict[str, psutil.Process]):
        import psutil

        self._psutil = psutil
        self._processes = processes
        self._loadavg = loadavg()
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, dict[str, float], dict[str, float]]:
        times = self._psutil.cpu_times()
        busy = times.user + times.nice + times.system + times.irq + times.softirq
        own: dict[str, float] = {}
        loops: dict[str, float] = {}
        for name, process in self._processes.items():
            with contextlib.suppress(self._psutil.Error):
                t = process.cpu_times()
                own[name] = t.user + t.system
                # The main thread runs the event loop; in the engine processes the rest is the engine thread,
                # so this splits "serving work" from "model work" (they share one GIL).
                for thread in process.threads():
                    if thread.id == process.pid:
                        loops[name] = thread.user_time + thread.system_time
        return time.perf_counter(), busy, getattr(times, "steal", 0.0), own, loops

    def stop(self) -> dict[str, Any]:
        wall0, busy0, steal0, own0, loops0 = self._start
        wall1, busy1, steal1, own1, loops1 = self._sample()
        wall = wall1 - wall0
        cores = {name: (own1[name] - own0[name]) / wall for name in own1 if name in own0}
        ours = sum(cores.values())
        return {
            "wall_s": wall,
            "cores": cores,
            "event_loop_cores": {
                name: (loops1[name] - loops0[name]) / wall for name in loops1 if name in loops0
            },
            "own_cores": ours,
            # Clamped: /proc/stat ticks and per-process times differ in granularity by ~10 ms.
            "background_cores": max(0.0, (busy1 - busy0) / wall - ours),
            "steal_cores": (steal1 - steal0) / wall,
            "loadavg_before": self._loadavg,
            "loadavg_after": loadavg(),
        }


def background_cores(seconds: float) -> float:
    """Cores busy machine-wide over `seconds`; ours idle meanwhile, so nearly all of it is others' work."""
    import psutil

    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    start = busy()
    time.sleep(seconds)
    return (busy() - start) / seconds


async def wait_quiet(args: argparse.Namespace) -> dict[str, float]:
    """Wait (up to --quiet-wait s) until other processes use less than --quiet-below cores: on a shared 2-core
    box one busy neighbour halves what the engine gets, which would swamp a 5 % effect."""
    waited, seen = 0.0, math.inf
    while True:
        seen = await asyncio.to_thread(background_cores, 1.0)
        if seen < args.quiet_below or waited >= args.quiet_wait:
            return {"waited_s": waited, "background_cores_before": seen}
        waited += 1.0


# -- workload ------------------------------------------------------------------------------------------------


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    offset: float  # arrival, seconds after the run starts


def parse_range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: want LO,HI with 1 <= LO <= HI")
    return lo, hi


def ordinary_ids(model_dir: Path) -> list[int]:
    """Token ids a prompt may use: the tokenizer's vocabulary without special tokens (random ids cost what
    text costs, and make the workload the same for any tokenizer)."""
    from services.instance.models.loader import load_tokenizer, read_config

    tokenizer = load_tokenizer(model_dir)
    limit = min(tokenizer.vocab_size, int(read_config(model_dir)["vocab_size"]))
    special = set(tokenizer.all_special_ids)
    return [i for i in range(limit) if i not in special]


def make_requests(
    ids: list[int],
    n: int,
    seed: str,
    prompt_len: tuple[int, int],
    new_tokens: tuple[int, int],
    rate: float = math.inf,
) -> list[Request]:
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        if i and math.isfinite(rate):
            t += rng.expovariate(rate)
        offsets.append(t)
    return [
        Request([rng.choice(ids) for _ in range(rng.randint(*prompt_len))], rng.randint(*new_tokens), offset)
        for offset in offsets
    ]


# -- one request on each path --------------------------------------------------------------------------------


@dataclass
class Timing:
    index: int
    sent: float  # seconds after the run's start
    ttft: float | None
    latency: float
    output_tokens: int
    chunks: int  # outputs (inproc) or SSE chunks with choices (served) that carried this request
    text: str = ""
    error: str | None = None


async def _at(start: float, offset: float) -> None:
    delay = start + offset - time.perf_counter()
    if delay > 0:  # no await at all otherwise: "all at once" requests go out in one loop iteration
        await asyncio.sleep(delay)


class InProcess:
    def __init__(self, engine: AsyncEngine, decode: Callable[[list[int]], str]):
        self.engine = engine
        self.decode = decode
        self._ids = 0

    async def one(self, index: int, request: Request, start: float) -> Timing:
        from services.instance.engine.sampling_params import SamplingParams

        await _at(start, request.offset)
        self._ids += 1
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
        sent = time.perf_counter()
        stream = self.engine.add_request(f"inproc-{self._ids}", request.prompt, params)
        first: float | None = None
        tokens: list[int] = []
        outputs = 0
        async for out in stream:
            if out.new_token_ids:
                if first is None:
                    first = time.perf_counter()
                outputs += 1
                tokens.extend(out.new_token_ids)
        end = time.perf_counter()
        ttft = None if first is None else first - sent
        return Timing(index, sent - start, ttft, end - sent, len(tokens), outputs, self.decode(tokens))


class Served:
    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, headers: dict[str, str]):
        self.session = session
        self.url = url
        self.model = model
        self.headers = headers

    def payload(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def one(self, index: int, request: Request, start: float) -> Timing:
        await _at(start, request.offset)
        payload = self.payload(request)
        first: float | None = None
        chunks = 0
        usage_tokens: int | None = None
        texts: list[str] = []
        error: str | None = None
        sent = time.perf_counter()
        async with self.session.post(
            f"{self.url}/v1/completions", json=payload, headers=self.headers
        ) as response:
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.text())[:300]}"
            else:
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = json.dumps(event["error"])[:300]
                        continue
                    if event.get("choices"):
                        if first is None:
                            first = time.perf_counter()
                        chunks += 1
                        texts.append(event["choices"][0].get("text") or "")
                    if event.get("usage"):
                        usage_tokens = event["usage"]["completion_tokens"]
        end = time.perf_counter()
        if error is None and usage_tokens is None:
            error = "no usage chunk"
        ttft = None if first is None else first - sent
        return Timing(index, sent - start, ttft, end - sent, usage_tokens or 0, chunks, "".join(texts), error)


OneRequest = Callable[[int, Request, float], Awaitable[Timing]]


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Every thread of this process on `cpus` meanwhile (None: no change). With --pin-cores the in-process
    runs get the instance's own affinity, so both paths run their engine on the same cores."""
    if not cpus:
        yield
        return
    import psutil

    threads = [t.id for t in psutil.Process().threads()]
    before = {tid: os.sched_getaffinity(tid) for tid in threads}
    for tid in threads:
        os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, mask in before.items():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, mask)


async def run_batch(one: OneRequest, requests: list[Request]) -> tuple[list[Timing], float]:
    """Every request at its arrival time; returns the timings and the wall time to the last completion."""
    start = time.perf_counter()
    timings = await asyncio.gather(*(one(i, r, start) for i, r in enumerate(requests)))
    wall = max(t.sent + t.latency for t in timings)
    return list(timings), wall


def summarize_run(path: str, rep: int, timings: list[Timing], wall: float, cpu: dict[str, Any]) -> dict:
    ok = [t for t in timings if t.error is None]
    tokens = sum(t.output_tokens for t in ok)
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    # In-process runs are charged this process only (the idle cluster's heartbeats are not theirs).
    cpu_s = (cpu["cores"].get("bench", 0.0) if path == "inproc" else cpu["own_cores"]) * cpu["wall_s"]
    return {
        "path": path,
        "rep": rep,
        "wall_s": wall,
        "output_tokens": tokens,
        "out_tok_s": tokens / wall if wall > 0 else math.nan,
        "failed": len(timings) - len(ok),
        # Tokens per CPU second of the processes doing the work (served: every service and the client): the
        # serving path's CPU cost, which a busy neighbour distorts less than wall-clock throughput.
        "out_tok_per_cpu_s": tokens / cpu_s if cpu_s > 0 else math.nan,
        "ttft_p50_ms": ms(median(ttfts)),
        "ttft_p90_ms": ms(percentile(ttfts, 90)),
        "cpu": cpu,
        "requests": [asdict(t) for t in timings],
    }


# -- the served cluster --------------------------------------------------------------------------------------


@dataclass
class ServedSetup:
    cluster: Cluster
    url: str
    headers: dict[str, str]
    instance_argv: list[str]
    instance_id: str
    nats_url: str
    prefix: str
    instance_cpus: frozenset[int] | None  # the instance's CPU affinity (--pin-cores), else None
    control_cpus: frozenset[int] | None  # the control plane's (NATS, Redis, coordinator, router), else None
    processes: dict[str, int] = field(default_factory=dict)  # name → pid, for CPU accounting


def plan_cluster(args: argparse.Namespace, model_dir: Path, dtype: str) -> ServedSetup:
    """Start NATS and Redis and plan the services exactly as `ecoserve up` would (same argv and env)."""
    from services.infra.embedded import free_port, start_nats, start_redis
    from services.launcher import Cluster, add_up_args, core_plan, plan_children

    up_parser = argparse.ArgumentParser()
    add_up_args(up_parser)
    port = free_port()
    up = up_parser.parse_args(
        [
            "--model", str(model_dir),
            "--dtype", dtype,
            "--instances", "1",
            "--threads-per-instance", str(args.threads),
            "--port", str(port),
            "--strategy", args.policy,
            "--kv-cache-gb", str(args.kv_cache_gb),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-num-seqs", str(args.max_num_seqs),
            "--prefix", f"overhead{os.getpid()}",
            "--pin-cores", args.pin_cores,
        ]
    )  # fmt: skip
    cluster = Cluster()
    control = core_plan(up).control
    # Started here, in the main thread: the embedded servers die with the thread that started them.
    cluster.servers.append(start_nats(cpus=control))
    cluster.servers.append(start_redis(cpus=control))
    nats_url, redis_url = cluster.servers[0].url, cluster.servers[1].url
    cluster.children = plan_children(up, nats_url, redis_url, str(model_dir))
    (instance,) = [c for c in cluster.children if c.name.startswith("instance")]
    headers = {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}
    setup = ServedSetup(
        cluster,
        f"http://{up.host}:{up.port}",
        headers,
        instance.argv,
        instance.name,
        nats_url,
        up.prefix,
        instance.cpus,
        control,
    )
    setup.processes = {"nats": cluster.servers[0].process.pid, "redis": cluster.servers[1].process.pid}
    return setup


def start_cluster(setup: ServedSetup, log_dir: Path) -> None:
    from services.launcher import wait_healthy

    for child in setup.cluster.children:
        log = open(log_dir / f"{child.name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        cpus = child.cpus
        pin = (lambda cpus=cpus: os.sched_setaffinity(0, cpus)) if cpus else None  # as Child.start does
        child.process = subprocess.Popen(
            child.argv, env=child.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
        setup.processes[child.name] = child.process.pid
    if not wait_healthy(setup.url, setup.cluster, READY_TIMEOUT):
        tails = "\n".join(
            f"--- {c.name}\n{(log_dir / f'{c.name}.log').read_text(errors='replace')[-3000:]}"
            for c in setup.cluster.children
        )
        raise RuntimeError(f"the cluster did not become ready\n{tails}")


def client_off_the_engine(setup: ServedSetup) -> None:
    """Every thread of this process (the client) on the control plane's cores, where a remote client's
    bursts would not be: in-process runs move it back to the instance's cores (`pinned`)."""
    assert setup.control_cpus is not None
    _all_threads_on(setup.control_cpus)


def _all_threads_on(cpus: Iterable[int]) -> None:
    import psutil

    for thread in psutil.Process().threads():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(thread.id, cpus)


# The cores this benchmark may use, as it started: the next model's cluster is planned on all of them, not
# on the control-plane cores the client was moved to for the previous one.
START_CPUS = frozenset(os.sched_getaffinity(0))


def served_model_name(setup: ServedSetup) -> tuple[str, int | None]:
    request = urllib.request.Request(f"{setup.url}/v1/models", headers=setup.headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        entry = json.load(response)["data"][0]
    return entry["id"], entry.get("max_model_len")


def router_submit_latency(setup: ServedSetup) -> tuple[float, float]:
    """(sum seconds, count) of the router's SubmitRequest round trips so far (its Prometheus histogram)."""
    request = urllib.request.Request(f"{setup.url}/metrics", headers=setup.headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("ecoserve_router_submit_latency_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("ecoserve_router_submit_latency_seconds_count"):
            count = float(line.split()[-1])
    return total, count


# -- one model -----------------------------------------------------------------------------------------------


def model_path(name: str, dtype: str) -> Path:
    from services.instance.models import smollm2, tiny
    from services.instance.models.cache import cache_root

    if name == "tiny":
        # The tests' tiny llama (~5 M parameters, saved in fp32; the loader casts to the asked dtype).
        return tiny.cached_model("llama", cache_root() / "models" / "random")
    return smollm2.default_model_path(dtype)


def parse_model(spec: str) -> tuple[str, str]:
    name, _, dtype = spec.strip().partition(":")
    if name not in MODEL_DEFAULT_DTYPE:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODEL_DEFAULT_DTYPE)}")
    return name, dtype or MODEL_DEFAULT_DTYPE[name]


def bench_model(args: argparse.Namespace, name: str, dtype: str, log_dir: Path) -> dict[str, Any]:
    import psutil
    import torch

    from services.cli import engine_config_from_args
    from services.instance.__main__ import build_parser as instance_parser
    from services.instance.engine.llm_engine import LLMEngine
    from services.instance.models.loader import load_tokenizer

    model_dir = model_path(name, dtype)
    print(f"\n== {name} ({dtype}) from {model_dir}", flush=True)
    ids = ordinary_ids(model_dir)
    seed = f"{args.seed}-{name}"
    throughput = make_requests(ids, args.requests, f"tp-{seed}", args.prompt_len, args.new_tokens, args.rate)
    latency = make_requests(
        ids, args.latency_repeats, f"lat-{seed}", args.latency_prompt_len, args.latency_new_tokens
    )
    warmup = [Request(r.prompt[:32], 8, 0.0) for r in throughput[:4]]

    setup = plan_cluster(args, model_dir, dtype)
    try:
        start_cluster(setup, log_dir)
        if setup.control_cpus:
            client_off_the_engine(setup)
            print(
                f"  instance on cores {sorted(setup.instance_cpus or ())}; NATS, Redis, coordinator, router "
                f"and this client on {sorted(setup.control_cpus)}",
                flush=True,
            )
        served_name, served_max_len = served_model_name(setup)
        # The in-process engine gets the instance's own parsed settings: identical by construction.
        inst = instance_parser().parse_args(setup.instance_argv[3:])
        config = engine_config_from_args(inst)
        torch.set_num_threads(inst.threads)
        engine = LLMEngine.from_pretrained(inst.model, dtype=inst.dtype, device=inst.device, config=config)
        tokenizer = load_tokenizer(model_dir)
        processes = {"bench": psutil.Process()} | {
            label: psutil.Process(pid) for label, pid in setup.processes.items()
        }
        result = _run(
            _measure(args, setup, engine, tokenizer, served_name, processes, throughput, latency, warmup)
        )
        stats = engine.stats()
    finally:
        setup.cluster.stop()
        _all_threads_on(START_CPUS)
    return {
        "model": name,
        "dtype": dtype,
        "path": str(model_dir),
        "served_model_name": served_name,
        "torch_threads": inst.threads,
        "instance_argv": setup.instance_argv[1:],
        "engine": {
            **asdict(config),
            "kv_blocks": stats.kv_blocks_total,
            "max_model_len": stats.max_model_len,
            "served_max_model_len": served_max_len,
        },
        **result,
    }


async def _measure(
    args: argparse.Namespace,
    setup: ServedSetup,
    engine_core: Any,
    tokenizer: Any,
    served_name: str,
    processes: dict[str, psutil.Process],
    throughput: list[Request],
    latency: list[Request],
    warmup: list[Request],
) -> dict[str, Any]:
    import aiohttp

    from services.instance.engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_core, clock=time.time)  # the instance's clock
    engine.start()
    inproc = InProcess(engine, lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            served = Served(session, setup.url, served_name, setup.headers)
            paths: dict[str, OneRequest] = {"inproc": inproc.one, "served": served.one}
            # First-call costs (kernel load, allocator, connections, tokenizer caches) stay out of the runs.
            for one in paths.values():
                for _ in range(2):
                    await run_batch(one, warmup)
            result: dict[str, Any] = {}
            if "throughput" in args.scenarios:
                result["throughput"] = await _throughput(args, setup, paths, processes, throughput)
            if "latency" in args.scenarios:
                result["latency"] = await _latency(args, setup, paths, processes, latency)
                result["latency"]["breakdown"] = await _breakdown(args, setup, served, latency)
                result["latency"]["floor"] = await _floor(args, setup, served, latency, result["latency"])
            return result
    finally:
        await engine.shutdown()


async def _throughput(
    args: argparse.Namespace,
    setup: ServedSetup,
    paths: dict[str, OneRequest],
    processes: dict[str, psutil.Process],
    requests: list[Request],
) -> dict[str, Any]:
    runs = []
    for rep in range(args.repeats):
        order = ["inproc", "served"] if rep % 2 == 0 else ["served", "inproc"]
        for path in order:
            quiet = await wait_quiet(args)
            with pinned(setup.instance_cpus if path == "inproc" else None):
                meter = CpuMeter(processes)
                timings, wall = await run_batch(paths[path], requests)
                cpu = meter.stop()
            run = summarize_run(path, rep, timings, wall, cpu | quiet)
            runs.append(run)
            print(
                f"  throughput {path:6s} rep {rep}: {run['out_tok_s']:7.1f} tok/s, wall {wall:6.2f} s, "
                f"TTFT p50 {run['ttft_p50_ms']:8.1f} ms, background {run['cpu']['background_cores']:.2f} "
                f"cores, failed {run['failed']}",
                flush=True,
            )
    by_path = {p: [r for r in runs if r["path"] == p] for p in ("inproc", "served")}
    tok_s = {p: median([r["out_tok_s"] for r in rs]) for p, rs in by_path.items()}
    tok_cpu = {p: median([r["out_tok_per_cpu_s"] for r in rs]) for p, rs in by_path.items()}
    pair_ratios = [
        s["out_tok_s"] / i["out_tok_s"] for i, s in zip(by_path["inproc"], by_path["served"], strict=True)
    ]
    # Greedy text of each request on both paths (first repeat); bf16 near-ties may flip under other batching.
    inproc_texts = [r["text"] for r in by_path["inproc"][0]["requests"]]
    served_texts = [r["text"] for r in by_path["served"][0]["requests"]]
    return {
        "requests": len(requests),
        "prompt_tokens": sum(len(r.prompt) for r in requests),
        "max_new_tokens": sum(r.max_tokens for r in requests),
        "rate": args.rate if math.isfinite(args.rate) else "inf",
        "inproc_tok_s": tok_s["inproc"],
        "served_tok_s": tok_s["served"],
        "ratio": tok_s["served"] / tok_s["inproc"],
        "pair_ratios": pair_ratios,
        "inproc_tok_per_cpu_s": tok_cpu["inproc"],
        "served_tok_per_cpu_s": tok_cpu["served"],
        "cpu_ratio": tok_cpu["served"] / tok_cpu["inproc"],
        "inproc_ttft_p50_ms": median([r["ttft_p50_ms"] for r in by_path["inproc"]]),
        "served_ttft_p50_ms": median([r["ttft_p50_ms"] for r in by_path["served"]]),
        "same_text": sum(a == b for a, b in zip(inproc_texts, served_texts, strict=True)),
        "runs": runs,
    }


async def _latency(
    args: argparse.Namespace,
    setup: ServedSetup,
    paths: dict[str, OneRequest],
    processes: dict[str, psutil.Process],
    requests: list[Request],
) -> dict[str, Any]:
    quiet = await wait_quiet(args)
    submit_before = await asyncio.to_thread(router_submit_latency, setup)
    meter = CpuMeter(processes)
    pairs = []
    for i, request in enumerate(requests):
        order = ["inproc", "served"] if i % 2 == 0 else ["served", "inproc"]
        pair: dict[str, Any] = {"index": i, "prompt_tokens": len(request.prompt)}
        for path in order:
            await asyncio.sleep(args.latency_gap)  # both paths start from an idle system
            with pinned(setup.instance_cpus if path == "inproc" else None):
                timing = await paths[path](i, request, time.perf_counter())
            pair[path] = asdict(timing)
        pairs.append(pair)
    cpu = meter.stop() | quiet
    submit_after = await asyncio.to_thread(router_submit_latency, setup)
    ok = [p for p in pairs if p["inproc"]["ttft"] is not None and p["served"]["ttft"] is not None]
    ok = [p for p in ok if p["served"]["error"] is None]
    ttft_diff = [p["served"]["ttft"] - p["inproc"]["ttft"] for p in ok]
    e2e_diff = [p["served"]["latency"] - p["inproc"]["latency"] for p in ok]
    submits = submit_after[1] - submit_before[1]
    result = {
        "repeats": len(requests),
        "failed": len(requests) - len(ok),
        "inproc_ttft_p50_ms": ms(median([p["inproc"]["ttft"] for p in ok])),
        "inproc_ttft_p90_ms": ms(percentile([p["inproc"]["ttft"] for p in ok], 90)),
        "served_ttft_p50_ms": ms(median([p["served"]["ttft"] for p in ok])),
        "served_ttft_p90_ms": ms(percentile([p["served"]["ttft"] for p in ok], 90)),
        "added_ttft_p50_ms": ms(median(ttft_diff)),
        "added_ttft_p90_ms": ms(percentile(ttft_diff, 90)),
        "added_e2e_p50_ms": ms(median(e2e_diff)),
        "added_e2e_p90_ms": ms(percentile(e2e_diff, 90)),
        # Router → coordinator → instance → coordinator → router, part of the added TTFT.
        "router_submit_mean_ms": ms((submit_after[0] - submit_before[0]) / submits) if submits else None,
        "same_text": sum(p["inproc"]["text"] == p["served"]["text"] for p in ok),
        "cpu": cpu,
        "pairs": pairs,
    }
    print(
        f"  latency: TTFT inproc p50 {result['inproc_ttft_p50_ms']:.2f} ms, served p50 "
        f"{result['served_ttft_p50_ms']:.2f} ms, added p50 {result['added_ttft_p50_ms']:.2f} / p90 "
        f"{result['added_ttft_p90_ms']:.2f} ms (submit round trip {result['router_submit_mean_ms'] or 0:.2f} "
        f"ms), background {cpu['background_cores']:.2f} cores",
        flush=True,
    )
    return result


async def _floor(
    args: argparse.Namespace, setup: ServedSetup, served: Served, requests: list[Request], latency: dict
) -> dict[str, Any]:
    """The transport floor, measured now on this machine: the same client, payloads and idle gaps against
    stand-ins that only move bytes over the served path's hops (bench/transport_floor.py): HTTP alone, and
    HTTP plus three NATS hops through this cluster's nats-server. What the served path adds beyond the
    latter is ecoserve's own work."""
    from transport_floor import measure_floor, start_floor_servers

    servers = start_floor_servers(setup.nats_url)
    try:
        times = await measure_floor(
            served.session,
            servers,
            [served.payload(request) for request in requests],
            args.latency_gap,
        )
    finally:
        servers.stop()
    result = {key: {"p50_ms": ms(median(v)), "p90_ms": ms(percentile(v, 90))} for key, v in times.items()}
    floor = result["http_and_nats"]["p50_ms"]
    added = latency.get("added_ttft_p50_ms")
    result["added_beyond_floor_p50_ms"] = None if added is None or floor is None else added - floor
    result["samples"] = {key: [ms(t) for t in v] for key, v in times.items()}
    print(
        f"  transport floor (no work, same client): HTTP {result['http']['p50_ms']:.2f} ms, "
        f"HTTP + 3 NATS hops {floor:.2f} ms p50; the served path adds {added:.2f} ms, "
        f"{result['added_beyond_floor_p50_ms']:.2f} ms beyond the floor",
        flush=True,
    )
    return result


SEGMENTS = (
    ("client_to_router", "HTTP in: client send -> router handler"),
    ("router_to_submit", "router: handler -> SubmitRequest on NATS"),
    ("coordinator", "coordinator: SubmitRequest -> DispatchRequest"),
    ("instance_accept", "instance: DispatchRequest -> engine add_request"),
    ("engine_queue", "engine: add_request -> step start"),
    ("step_and_publish", "engine step + publish: step start -> TokenChunk on NATS"),
    ("chunk_to_client", "router + HTTP out: TokenChunk -> client's first chunk"),
)


async def _breakdown(
    args: argparse.Namespace, setup: ServedSetup, served: Served, requests: list[Request]
) -> dict[str, Any]:
    """Where a served TTFT goes, from a separate pass of sequential requests (not the measured ones: the extra
    subscriber costs NATS and this process a little). A passive NATS subscriber timestamps each hop's message
    (its own delivery delay included); the engine's timestamps come in the first TokenChunk (first_token_time
    is its step's start, and queue_time = step start - add_request). All clocks: this machine's time.time."""
    import nats

    from shared import subjects
    from shared.messages import DispatchRequest, SubmitRequest, TokenBatch, TokenChunk
    from shared.wire import decode

    seen: dict[str, dict[str, tuple[float, Any]]] = {}

    async def on_message(msg: Any) -> None:
        now = time.time()
        message = decode(msg.data)
        messages = message.chunks if isinstance(message, TokenBatch) else [message]
        for message in messages:
            if isinstance(message, TokenChunk) and message.seq != 0:
                continue
            if isinstance(message, SubmitRequest | DispatchRequest | TokenChunk):
                seen.setdefault(message.request_id, {}).setdefault(type(message).__name__, (now, message))

    nc = await nats.connect(setup.nats_url)
    rows = []
    try:
        for subject in (
            subjects.submit(setup.prefix),
            subjects.instance_requests(setup.prefix, setup.instance_id),
            f"{setup.prefix}.router.*.tokens",
        ):
            await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        await nc.flush()  # nats-py's first PONG can overtake its SUBs (services/infra/nats_sync.py)
        for i, request in enumerate(requests):
            await asyncio.sleep(args.latency_gap)
            sent = time.time()
            timing = await served.one(i, request, time.perf_counter())
            await asyncio.sleep(0.01)  # the subscriber's copies may trail the client's answer
            mine = [
                hops
                for hops in seen.values()
                if "SubmitRequest" in hops and hops["SubmitRequest"][1].arrival_time >= sent
            ]
            seen.clear()
            if len(mine) != 1 or timing.ttft is None or len(mine[0]) != 3:
                continue
            (t_submit, submit), (t_dispatch, _), (t_chunk, chunk) = (
                mine[0][k] for k in ("SubmitRequest", "DispatchRequest", "TokenChunk")
            )
            if chunk.first_token_time is None or chunk.queue_time is None:
                continue
            added = chunk.first_token_time - chunk.queue_time  # the engine's add_request
            rows.append(
                {
                    "client_to_router": submit.arrival_time - sent,
                    "router_to_submit": t_submit - submit.arrival_time,
                    "coordinator": t_dispatch - t_submit,
                    "instance_accept": added - t_dispatch,
                    "engine_queue": chunk.queue_time,
                    "step_and_publish": t_chunk - chunk.first_token_time,
                    "chunk_to_client": sent + timing.ttft - t_chunk,
                    "ttft": timing.ttft,
                }
            )
    finally:
        await nc.close()
    medians = {key: ms(median([row[key] for row in rows])) for key, _ in (*SEGMENTS, ("ttft", ""))}
    print(f"  served TTFT breakdown (median ms over {len(rows)} requests):")
    for key, label in SEGMENTS:
        print(f"    {label:58s} {_f(medians[key], 3):>8s}")
    print(f"    {'TTFT':58s} {_f(medians['ttft'], 3):>8s}", flush=True)
    return {"requests": len(rows), "median_ms": medians, "rows": rows}


def _run(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())  # the services run on uvloop too


# -- report --------------------------------------------------------------------------------------------------


def bars(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "throughput" in result:
        out["throughput_ratio"] = result["throughput"]["ratio"]
        out["throughput_met"] = result["throughput"]["ratio"] >= THROUGHPUT_BAR
    if "latency" in result:
        out["added_ttft_p50_ms"] = result["latency"]["added_ttft_p50_ms"]
        out["added_ttft_met"] = result["latency"]["added_ttft_p50_ms"] <= TTFT_BAR_MS
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_tables(results: list[dict[str, Any]]) -> None:
    print(
        "\nThroughput (median of runs; cores = served run: instance / router / coordinator / nats+redis / "
        "bench client, and other processes)\n"
    )
    print(
        "| model | threads | in-process tok/s | served tok/s | ratio (bar >= 0.95) | tok per CPU-s ratio "
        "| TTFT p50 in-proc / served ms | served cores inst/router/coord/nats+redis/client "
        "| background cores | same text |"
    )
    print("|" + "---|" * 10)
    for r in results:
        t = r.get("throughput")
        if t is None:
            continue
        served = [run for run in t["runs"] if run["path"] == "served"]
        c = {k: median([run["cpu"]["cores"].get(k, math.nan) for run in served]) for k in _CORE_KEYS}
        background = max(run["cpu"]["background_cores"] for run in t["runs"])
        print(
            f"| {r['model']} {r['dtype']} | {r['torch_threads']} | {_f(t['inproc_tok_s'])} "
            f"| {_f(t['served_tok_s'])} | {_f(t['ratio'], 3)} | {_f(t['cpu_ratio'], 3)} "
            f"| {_f(t['inproc_ttft_p50_ms'], 0)} / "
            f"{_f(t['served_ttft_p50_ms'], 0)} | {_f(c['instance-0'], 2)} / {_f(c['router'], 2)} / "
            f"{_f(c['coordinator'], 2)} / {_f(c['nats'] + c['redis'], 2)} / {_f(c['bench'], 2)} "
            f"| {_f(background, 2)} | {t['same_text']}/{t['requests']} |"
        )
    print("\nLatency (sequential single requests; added = served - in-process, per pair)\n")
    print(
        "| model | threads | TTFT p50 in-proc / served ms | added TTFT p50 (bar <= 2 ms) / p90 ms "
        "| added e2e p50 ms | router submit round trip ms | background cores |"
    )
    print("|" + "---|" * 7)
    for r in results:
        lat = r.get("latency")
        if lat is None:
            continue
        print(
            f"| {r['model']} {r['dtype']} | {r['torch_threads']} | {_f(lat['inproc_ttft_p50_ms'], 2)} / "
            f"{_f(lat['served_ttft_p50_ms'], 2)} | {_f(lat['added_ttft_p50_ms'], 2)} / "
            f"{_f(lat['added_ttft_p90_ms'], 2)} | {_f(lat['added_e2e_p50_ms'], 2)} "
            f"| {_f(lat['router_submit_mean_ms'], 2)} | {_f(lat['cpu']['background_cores'], 2)} |"
        )
    for r in results:
        b = r["bars"]
        verdicts = []
        if "throughput_met" in b:
            verdict = "meets" if b["throughput_met"] else "MISSES"
            verdicts.append(f"throughput ratio {b['throughput_ratio']:.3f} {verdict} >= {THROUGHPUT_BAR}")
        if "added_ttft_met" in b:
            verdict = "meets" if b["added_ttft_met"] else "MISSES"
            verdicts.append(f"added TTFT p50 {b['added_ttft_p50_ms']:.2f} ms {verdict} <= {TTFT_BAR_MS} ms")
        print(f"{r['model']} {r['dtype']}: " + "; ".join(verdicts))


_CORE_KEYS = ("instance-0", "router", "coordinator", "nats", "redis", "bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2[:dtype], tiny[:dtype]")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the instance and the baseline")
    p.add_argument("--scenarios", default="throughput,latency")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=parse_range, default=(32, 256))
    p.add_argument("--new-tokens", type=parse_range, default=(64, 128))
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson req/s; inf = all at once")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per path")
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--latency-prompt-len", type=parse_range, default=(16, 32))
    p.add_argument("--latency-new-tokens", type=parse_range, default=(8, 16))
    p.add_argument("--latency-gap", type=float, default=0.05, help="idle seconds before each request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="before each run, wait until other processes use fewer cores than this ...",
    )
    p.add_argument("--quiet-wait", type=float, default=60.0, help="... for at most this many seconds")
    # `ecoserve up`'s engine settings (services/launcher.py defaults).
    p.add_argument("--policy", default="sarathi", choices=["nodg", "sarathi"])
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument(
        "--pin-cores",
        choices=("auto", "on", "off"),
        default="auto",
        help="`ecoserve up --pin-cores`: the instance on cores of its own, the rest of the cluster and this "
        "client on the others; the in-process runs on the instance's cores",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 8 requests, 1 repeat, 5 latency pairs")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--log-dir", type=Path, help="service logs (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.quick:
        args.requests, args.repeats, args.latency_repeats = 8, 1, 5
        args.new_tokens = (8, 16)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(args.scenarios) - {"throughput", "latency"}:
        p.error(f"unknown scenarios {sorted(unknown)}")
    models = [parse_model(m) for m in args.models.split(",") if m.strip()]
    # Before torch is imported: the OpenMP pool is sized from it, as in the instance (launcher sets it).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="ecoserve-overhead-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"service logs in {log_dir}; load {loadavg()}", flush=True)
    load_before = loadavg()
    started = time.time()
    results = []
    for name, dtype in models:
        result = bench_model(args, name, dtype, log_dir)
        result["bars"] = bars(result)
        results.append(result)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": time.time() - started,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
        | {"json": str(args.json), "log_dir": str(log_dir), "rate": str(args.rate)},
        "bars": {"throughput_ratio_min": THROUGHPUT_BAR, "added_ttft_p50_ms_max": TTFT_BAR_MS},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": loadavg()},
        "versions": versions(),
        "git": git_info(),
        "results": results,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_tables(results)
    noisy = [
        run["cpu"]["background_cores"]
        for r in results
        for run in r.get("throughput", {}).get("runs", [])
        if run["cpu"]["background_cores"] > BACKGROUND_WARN_CORES
    ]
    if noisy:
        print(f"WARNING: other processes used up to {max(noisy):.2f} cores during some runs")
    print(f"\nload before {load_before}, after {loadavg()}; JSON -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
