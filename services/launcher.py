"""`ecoserve up`: the whole system on one machine — embedded NATS and Redis, a coordinator, N instances and
a router as child processes — until Ctrl-C, then everything stops cleanly."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from services.core_plan import PIN_MODES, CorePlan, pin_mode, plan_cores
from services.infra.embedded import EmbeddedServer, start_nats, start_redis

log = logging.getLogger("ecoserve.up")

# strategy → (instance policy, coordinator dispatch policy)
STRATEGIES: dict[str, tuple[str, str]] = {
    "padg": ("padg", "padg"),  # EcoServe: temporal disaggregation, rolling prefill windows
    "nodg": ("nodg", "least_loaded"),  # vLLM-style prefill first
    "sarathi": ("sarathi", "least_loaded"),  # chunked prefill, decode first
    # DistServe: prefill-role instances hand each request's KV to decode-role instances (--fudg-split)
    "fudg": ("nodg", "fudg"),
}


def fudg_split(instances: int | None, split: str | None) -> tuple[int, int]:
    """(prefill, decode) instance counts for `--strategy fudg`; ValueError says what is wrong.

    Without --fudg-split: half the instances prefill, rounded up, the rest decode (1:1 for 2 instances, 2:1
    for 3). DistServe picks the ratio per workload by simulating it; with no simulator here, the even split
    of its small-cluster placements is the neutral choice, and prefill gets the odd instance because on a CPU
    prefill is the compute-bound phase that sets TTFT. Decode batches many requests, so it needs fewer.
    """
    if split is None:
        total = 2 if instances is None else instances
        if total < 2:
            raise ValueError(f"fudg needs at least 2 instances (one prefill, one decode), got {total}")
        return -(-total // 2), total // 2
    parts = split.split(":")
    try:
        prefill, decode = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--fudg-split must be P:D (e.g. 1:1), got {split!r}") from None
    if prefill < 1 or decode < 1:
        raise ValueError(f"--fudg-split needs at least one prefill and one decode instance, got {split!r}")
    if instances is not None and instances != prefill + decode:
        raise ValueError(
            f"--fudg-split {split} is {prefill + decode} instances, but --instances is {instances}"
        )
    return prefill, decode


def instance_roles(args: argparse.Namespace) -> list[str]:
    """Each instance's --fudg-role, in start order ("none" outside fudg); ValueError for bad counts."""
    if args.strategy != "fudg":
        count = 1 if args.instances is None else args.instances
        if count < 1:
            raise ValueError(f"--instances must be at least 1, got {count}")
        return ["none"] * count
    prefill, decode = fudg_split(args.instances, args.fudg_split)
    return ["prefill"] * prefill + ["decode"] * decode


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    cpus: frozenset[int] | None = None  # CPU affinity (core_plan.py): engines and control plane apart
    process: subprocess.Popen | None = None

    def start(self) -> None:
        cpus = self.cpus
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=pin)

    @property
    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass
class Cluster:
    """The child processes of one `ecoserve up`, stopped in reverse order of dependency."""

    servers: list[EmbeddedServer] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def stop(self, timeout: float = 40.0) -> None:
        # Router first (no new work), then instances (they drain and deregister), then the coordinator.
        for group in ("router", "instance", "coordinator"):
            members = [c for c in self.children if c.name.startswith(group) and c.exited is None]
            for child in members:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in members:
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", child.name)
                    child.process.kill()
                    child.process.wait()
        for server in reversed(self.servers):
            server.stop()


def add_up_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--model",
        default=env("ECOSERVE_MODEL"),
        help="local HF model folder (default: SmolLM2-135M-Instruct, converted on first use)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=_int(env("ECOSERVE_INSTANCES")),
        help="engine processes (default: 1; fudg: the --fudg-split total, or 2)",
    )
    p.add_argument("--host", default=env("ECOSERVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("ECOSERVE_PORT", "8000")))
    p.add_argument("--api-key", default=env("ECOSERVE_API_KEY"), help="require this Bearer key on /v1/*")
    p.add_argument(
        "--strategy",
        default=env("ECOSERVE_STRATEGY", "sarathi"),
        choices=list(STRATEGIES),
        help="padg (rolling prefill windows), nodg, sarathi or fudg (prefill and decode instances): the "
        "instances' policy and the coordinator's dispatch",
    )
    p.add_argument(
        "--fudg-split",
        default=env("ECOSERVE_FUDG_SPLIT"),
        metavar="P:D",
        help="fudg: P prefill-role and D decode-role instances (default: half prefill, rounded up)",
    )
    p.add_argument(
        "--ttft-slo",
        type=float,
        default=float(env("ECOSERVE_TTFT_SLO", "5.0")),
        help="padg: TTFT SLO in seconds (a prefill window's budget)",
    )
    p.add_argument(
        "--tpot-slo",
        type=float,
        default=float(env("ECOSERVE_TPOT_SLO", "0.1")),
        help="padg: TPOT SLO in seconds (the decode slack a prefill may use)",
    )
    p.add_argument("--dtype", default=env("ECOSERVE_DTYPE", "bf16"))
    p.add_argument(
        "--threads-per-instance",
        type=int,
        default=_int(env("ECOSERVE_THREADS_PER_INSTANCE")),
        help="torch threads per instance (default: cores / instances, at least 1)",
    )
    p.add_argument(
        "--pin-cores",
        nargs="?",
        const="on",
        type=pin_mode,
        default=env("ECOSERVE_PIN_CORES", "auto"),
        metavar="{" + ",".join(PIN_MODES) + "}",
        help="CPU affinity: each instance on cores of its own, NATS, Redis, the coordinator and the router "
        "on the rest; auto (default): when every instance thread gets a core of its own",
    )
    p.add_argument(
        "--no-pin-cores", dest="pin_cores", action="store_const", const="off", help="--pin-cores off"
    )
    p.add_argument("--kv-cache-gb", type=float, default=float(env("ECOSERVE_KV_CACHE_GB", "1")))
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=int(env("ECOSERVE_MAX_NUM_BATCHED_TOKENS", "512"))
    )
    p.add_argument("--max-num-seqs", type=int, default=int(env("ECOSERVE_MAX_NUM_SEQS", "128")))
    p.add_argument(
        "--nats-url", default=env("ECOSERVE_NATS_URL"), help="use this NATS instead of starting one"
    )
    p.add_argument(
        "--redis-url", default=env("ECOSERVE_REDIS_URL"), help="use this Redis instead of starting one"
    )
    p.add_argument("--prefix", default=env("ECOSERVE_PREFIX", "ecoserve"))
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for the first instance"
    )


def _port_if_free(port: int) -> int | None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None  # taken: the embedded server picks a random free port
    return port


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def threads_per_instance(args: argparse.Namespace) -> int:
    return args.threads_per_instance or max(1, (os.cpu_count() or 1) // len(instance_roles(args)))


def core_plan(args: argparse.Namespace) -> CorePlan:
    """Where the processes of this `ecoserve up` run (the same answer every time it is asked)."""
    instances, threads = len(instance_roles(args)), threads_per_instance(args)
    mode = pin_mode(args.pin_cores) if hasattr(os, "sched_setaffinity") else "off"  # Linux only
    available = os.sched_getaffinity(0) if mode != "off" else range(os.cpu_count() or 1)
    return plan_cores(available, instances, threads, mode)


def plan_children(args: argparse.Namespace, nats_url: str, redis_url: str, model_dir: str) -> list[Child]:
    python = sys.executable
    common = ["--nats-url", nats_url, "--redis-url", redis_url, "--prefix", args.prefix]
    roles = instance_roles(args)
    threads = threads_per_instance(args)
    cores = core_plan(args)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    policy, dispatch = STRATEGIES[args.strategy]
    coordinator = [
        python,
        "-m",
        "services.coordinator",
        *common,
        "--dispatch-policy",
        dispatch,
        "--ttft-slo",
        str(args.ttft_slo),
        "--tpot-slo",
        str(args.tpot_slo),
    ]
    children = [Child("coordinator", coordinator, base_env, cores.control)]
    for i, role in enumerate(roles):
        env = {**base_env, "OMP_NUM_THREADS": str(threads)}
        argv = [
            python,
            "-m",
            "services.instance",
            *common,
            "--instance-id",
            f"instance-{i}",
            "--model",
            model_dir,
            "--dtype",
            args.dtype,
            "--threads",
            str(threads),
            "--policy",
            policy,
            "--kv-cache-gb",
            str(args.kv_cache_gb),
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
            "--max-num-seqs",
            str(args.max_num_seqs),
        ]
        if role != "none":
            argv += ["--fudg-role", role]
        children.append(Child(f"instance-{i}", argv, env, cores.instances[i]))
    router = [
        python,
        "-m",
        "services.router",
        *common,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--model",
        model_dir,
    ]
    router_env = dict(base_env)
    if args.api_key:
        router_env["ECOSERVE_API_KEY"] = args.api_key  # not on the command line, where `ps` would show it
    children.append(Child("router", router, router_env, cores.control))
    return children


def wait_healthy(url: str, cluster: Cluster, timeout: float, min_ready: int = 1) -> bool:
    """Until the router's /health counts `min_ready` ready instances (False: a child exited, or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in cluster.children:
            if child.exited is not None:
                log.error("%s exited with code %s during start-up", child.name, child.exited)
                return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200 and json.load(response)["ready_instances"] >= min_ready:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    log.error("no instance became ready within %.0f s", timeout)
    return False


def run_up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        roles = instance_roles(args)
    except ValueError as exc:
        print(f"ecoserve up: {exc}", file=sys.stderr)
        return 2
    if not (args.ttft_slo > 0 and args.tpot_slo > 0):
        print("ecoserve up: --ttft-slo and --tpot-slo must be positive", file=sys.stderr)
        return 2
    from services.instance.models.loader import ModelError, check_architecture, resolve_model_path

    try:
        # Resolve (and, for the default model, convert) once here rather than in N instances at once.
        model_dir = resolve_model_path(args.model, dtype=args.dtype)
        check_architecture(model_dir)
    except ModelError as exc:
        print(f"ecoserve up: {exc}", file=sys.stderr)
        return 2
    cluster = Cluster()
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        nats_url, redis_url = args.nats_url, args.redis_url
        # The standard ports when free, so `ecoserve admin` and redis-cli find them without flags.
        control = core_plan(args).control
        if not nats_url:
            server = start_nats(_port_if_free(4222), cpus=control)
            cluster.servers.append(server)
            nats_url = server.url
        if not redis_url:
            server = start_redis(_port_if_free(6379), cpus=control)
            cluster.servers.append(server)
            redis_url = server.url
        log.info("NATS %s, Redis %s", nats_url, redis_url)
        cluster.children = plan_children(args, nats_url, redis_url, str(model_dir))
        for child in cluster.children:
            child.start()
        url = f"http://{args.host}:{args.port}"
        # FuDG serves nothing until both roles are up: wait for every instance.
        min_ready = len(roles) if args.strategy == "fudg" else 1
        if not wait_healthy(url, cluster, args.ready_timeout, min_ready):
            return 1
        shape = (
            ""
            if args.strategy != "fudg"
            else f": {roles.count('prefill')} prefill, {roles.count('decode')} decode"
        )
        print(
            f"ecoserve is up: {url}/v1  (model {model_dir.name}, {len(roles)} instance(s){shape}, "
            f"strategy {args.strategy}); Ctrl-C to stop",
            flush=True,
        )
        print(json.dumps({"url": url, "nats_url": nats_url, "redis_url": redis_url}), flush=True)
        print(f"admin: ecoserve admin --nats-url {nats_url} --prefix {args.prefix} status", flush=True)
        while stop["signal"] is None:
            dead = [c for c in cluster.children if c.exited is not None]
            if dead:
                for child in dead:
                    log.error("%s exited with code %s", child.name, child.exited)
                if any(not c.name.startswith("instance") for c in dead) or all(
                    c.exited is not None for c in cluster.children if c.name.startswith("instance")
                ):
                    return 1
                cluster.children = [c for c in cluster.children if c.exited is None]
            time.sleep(0.5)
        log.info("stopping (signal %s)", stop["signal"])
        return 0
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecoserve up", description=__doc__)
    add_up_args(parser)
    return run_up(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
