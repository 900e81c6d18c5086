"""The prefill profile an instance measures at start-up and announces in its registration
(`InstanceInfo.prefill_profile`), for the coordinator's PaDG admission check.

Measured in the engine thread before the instance subscribes to anything, so no request shares its steps and
the event loop stays free. A profile is cached on disk (in the ecoserve cache dir) under a key naming
everything the timings depend on (model folder and its weights, dtype, device, torch threads, the engine's
step budget and pool, the lengths), so a restart announces it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from services.instance.engine.async_engine import AsyncEngine
from services.instance.engine.llm_engine import LLMEngine
from services.instance.engine.profiling import default_lengths, profile_prefill
from services.instance.models.cache import cache_root
from shared.prefill_profile import PrefillProfile

log = logging.getLogger(__name__)

PROFILE_MODES = ("auto", "on", "off")
LONGEST = 4096  # profiled lengths stop here (the authors' predictor anchors at 4096 tokens)
TIME_BUDGET = 60.0  # seconds: longer lengths are skipped once they would overrun it
CACHE_VERSION = 1


def wants_profile(mode: str, policy: str) -> bool:
    """auto: only a padg instance needs a profile (the coordinator's PaDG dispatch reads it)."""
    if mode not in PROFILE_MODES:
        raise ValueError(f"profile_prefill must be one of {', '.join(PROFILE_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and policy == "padg")


def default_cache_dir() -> Path:
    return cache_root() / "prefill-profiles"


def profile_lengths(max_model_len: int) -> list[int]:
    """16, 32, …, up to LONGEST tokens, each leaving room in the context for one generated token."""
    return default_lengths(min(max_model_len, LONGEST + 1))


def cache_key(engine: LLMEngine, lengths: list[int]) -> dict[str, Any]:
    """Everything a measurement depends on; a change in any of it measures again."""
    param = next(engine.model.parameters())
    folder = getattr(engine.model.config, "name_or_path", "") or ""
    return {
        "version": CACHE_VERSION,
        "model": str(folder),
        "weights": _weights_stamp(Path(folder)) if folder else [],
        "dtype": str(param.dtype),
        "device": str(param.device),
        "threads": torch.get_num_threads(),
        "block_size": engine.blocks.block_size,
        "kv_blocks_total": engine.blocks.num_blocks,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "lengths": lengths,
    }


async def startup_profile(engine: AsyncEngine, cache_dir: Path | None) -> PrefillProfile | None:
    """The engine's prefill profile: from the cache when its key matches, else measured (in the engine
    thread) and cached. None, with the reason logged, when nothing can be measured."""

    def measure(core: LLMEngine) -> PrefillProfile | None:
        lengths = profile_lengths(core.max_model_len)
        if not lengths:
            log.error("no prefill profile: the context of %d tokens is too short", core.max_model_len)
            return None
        key = cache_key(core, lengths)
        path = None if cache_dir is None else cache_dir / f"{_digest(key)}.json"
        if path is not None and (cached := _read(path, key)) is not None:
            log.info("prefill profile from %s", path)
            return cached
        profile = profile_prefill(core, lengths, time_budget=TIME_BUDGET)
        log.info("prefill profile: %s", ", ".join(f"{n} tokens {s * 1e3:.1f} ms" for n, s in profile.points))
        if path is not None:
            _write(path, key, profile)
        return profile

    return await engine.call(measure)


def _weights_stamp(folder: Path) -> list[list[Any]]:
    """Names, sizes and modification times of the weight files: a rebuilt model at the same path differs."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    except OSError:
        return []


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _read(path: Path, key: dict[str, Any]) -> PrefillProfile | None:
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cached prefill profile %s: %s", path, exc)
        return None
    if not isinstance(stored, dict) or stored.get("key") != json.loads(json.dumps(key)):
        return None
    try:
        return PrefillProfile.from_dict(stored.get("profile"))
    except ValueError as exc:
        log.warning("ignoring malformed cached prefill profile %s: %s", path, exc)
        return None


def _write(path: Path, key: dict[str, Any], profile: PrefillProfile) -> None:
    """Atomically (write a temporary file, rename): a concurrent reader never sees half a profile."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump({"key": key, "profile": profile.to_dict()}, handle)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the prefill profile in %s: %s", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
