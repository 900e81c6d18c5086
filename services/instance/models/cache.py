"""The on-disk model cache: where it lives, a cross-process lock, and atomic publication of a built folder.

Builders write into a temporary sibling folder and rename it into place, so a reader never sees a half-written
model; the lock makes a second process wait for the first build instead of repeating (or clobbering) it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER_NAME = "ecoserve-build.json"


def cache_root() -> Path:
    """`$ECOSERVE_CACHE_DIR`, else `~/.cache/ecoserve`."""
    configured = os.environ.get("ECOSERVE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ecoserve"


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<target>.lock` (blocking) for the duration of the block."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The build spec recorded in `folder`, or None when the folder is absent, partial or unreadable."""
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_current(folder: Path, spec: dict[str, Any]) -> bool:
    # Round-trip the spec through JSON so tuples vs lists etc. don't cause spurious rebuilds.
    return read_marker(folder) == json.loads(json.dumps(spec, sort_keys=True))


@contextlib.contextmanager
def publish_dir(target: Path, spec: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success, stamp it with `spec` and rename it to `target`.

    Call under `file_lock(target)`: the old `target` (a stale build) is removed just before the rename.
    On an exception the temporary folder is deleted and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        (staging / MARKER_NAME).write_text(json.dumps(spec, sort_keys=True, indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
