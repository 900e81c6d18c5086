"""Native kernels: compile a C source once per machine into a content-addressed cache, load it with ctypes.

The cache is `<cache root>/kernels/<source name>-<sha256 of source + flags + compiler + host CPU>.so`. A build
writes a temporary file next to the target and renames it into place, so concurrent builders (threads or
processes) never expose a half-written library: the last rename wins and every candidate is identical.
Each use stamps the library's access time; libraries of the same source not used for STALE_AFTER_S (left by
an older source, compiler or CPU) are deleted when another is built or used, so upgrades do not pile up.
If no compiler works, `NativeLibrary.get()` warns once and returns None, and callers use their torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from services.instance.models.cache import cache_root

# Tried in order. `-march=native` or OpenMP can be rejected (old or non-GCC compilers, a missing libgomp);
# `-fopenmp-simd` needs no runtime and still lets the portable loops vectorise.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp-simd"),
    ("-O3", "-fopenmp-simd"),
    ("-O3",),
)
COMMON_FLAGS = ("-std=gnu11", "-shared", "-fPIC")
DISABLE_ENV = "ECOSERVE_NATIVE_KERNELS"
COMPILE_TIMEOUT_S = 300
STALE_AFTER_S = 30 * 24 * 3600
_UNNAMED = re.compile(r"[0-9a-f]{32}\.so")  # the names of versions before the source name was in it


class KernelBuildError(RuntimeError):
    pass


def default_compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "gcc")


def native_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def _compiler_identity(compiler: tuple[str, ...]) -> str:
    try:
        proc = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"compiler {shlex.join(compiler)!r} is not usable: {exc}") from exc
    if proc.returncode != 0:
        raise KernelBuildError(f"{shlex.join(compiler)} --version failed: {proc.stderr.strip()}")
    return proc.stdout


@functools.cache
def _host_cpu() -> str:
    """CPU model and feature flags: `-march=native` output differs between hosts sharing a cache dir."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().split("\n\n", 1)[0].splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    return "\n".join(line for line in lines if line.startswith(("model name", "flags", "vendor_id")))


def library_path(name: str, source: bytes, flags: Sequence[str], compiler: Sequence[str]) -> Path:
    digest = hashlib.sha256()
    for part in (source, "\0".join(flags).encode(), _compiler_identity(tuple(compiler)).encode()):
        digest.update(part)
        digest.update(b"\0")
    if "-march=native" in flags:
        digest.update(_host_cpu().encode())
    return cache_root() / "kernels" / f"{name}-{digest.hexdigest()[:32]}.so"


def _compile(compiler: Sequence[str], source_path: Path, flags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    command = [*compiler, *flags, *COMMON_FLAGS, str(source_path), "-o", str(tmp), "-lm"]
    try:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"{shlex.join(command)}: {exc}") from exc
        if proc.returncode != 0:
            raise KernelBuildError(f"{shlex.join(command)} exited {proc.returncode}:\n{proc.stderr.strip()}")
        tmp.chmod(0o755)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def build_library(source_path: Path, compiler: Sequence[str] | None = None) -> tuple[Path, tuple[str, ...]]:
    """Path of the compiled library for `source_path` (building it if not cached) and the flags used."""
    compiler = list(compiler) if compiler is not None else default_compiler()
    source = source_path.read_bytes()
    failures: list[str] = []
    for flags in FLAG_SETS:
        target = library_path(source_path.stem, source, flags, compiler)
        if not target.exists():
            try:
                _compile(compiler, source_path, flags, target)
            except KernelBuildError as exc:
                failures.append(str(exc))
                continue
        _mark_used(target)
        prune_stale(target, source_path.stem, time.time())
        return target, flags
    raise KernelBuildError("every flag set failed:\n" + "\n".join(failures))


def _mark_used(path: Path) -> None:
    """Stamp the access time (mount options may not), keeping the modification time (the build's)."""
    with contextlib.suppress(OSError):  # a read-only cache: nothing gets pruned from it either
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def prune_stale(keep: Path, name: str, now: float) -> list[Path]:
    """Delete the other libraries of source `name` (and unnamed ones from older versions) last used more
    than STALE_AFTER_S ago; returns them. A process that still has one loaded keeps its mapping."""
    own = re.compile(re.escape(name) + r"-[0-9a-f]{32}\.so")
    removed = []
    for path in keep.parent.glob("*.so"):
        if path == keep or not (own.fullmatch(path.name) or _UNNAMED.fullmatch(path.name)):
            continue
        try:
            status = path.stat()
            if now - max(status.st_atime, status.st_mtime) > STALE_AFTER_S:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to delete
    return removed


class NativeLibrary:
    """Lazily builds and loads one C source; `get()` is None when disabled or when the build failed."""

    def __init__(
        self,
        source_path: Path,
        declare: Callable[[ctypes.CDLL], None],
        compiler: Sequence[str] | None = None,
    ) -> None:
        self.source_path = source_path
        self._declare = declare  # sets argtypes/restype, so a mismatched call fails in Python, not in C
        self._compiler = compiler
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._failed = False
        self.flags: tuple[str, ...] | None = None

    def get(self) -> ctypes.CDLL | None:
        if native_disabled():
            return None
        if self._library is not None or self._failed:
            return self._library
        with self._lock:
            if self._library is None and not self._failed:
                self._load()
        return self._library

    def _load(self) -> None:
        try:
            path, flags = build_library(self.source_path, self._compiler)
            library = ctypes.CDLL(str(path))
            self._declare(library)
        except (KernelBuildError, OSError, AttributeError) as exc:
            self._failed = True  # warn once per process, not on every call
            warnings.warn(
                f"native kernel {self.source_path.name} unavailable, using the torch fallback: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        self.flags = flags
        self._library = library
