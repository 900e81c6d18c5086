"""The engine core: add requests, run steps, emit each step's new tokens. Synchronous and single-threaded;
`async_engine.AsyncEngine` drives it from a thread for asyncio services."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.instance.engine.block_manager import BlockManager
from services.instance.engine.kv_cache import KVCache, KVGeometry
from services.instance.engine.kv_transfer import KvPayload, export_sequence, import_payload
from services.instance.engine.model_runner import ModelRunner
from services.instance.engine.policies import make_policy
from services.instance.engine.sampler import Sampler
from services.instance.engine.sampling_params import ParameterError, SamplingParams
from services.instance.engine.scheduler import Scheduler, SchedulerConfig
from services.instance.engine.sequence import FinishReason, Sequence, TokenLogprobs

GiB = 1024**3


@dataclass
class EngineConfig:
    policy: str = "sarathi"
    block_size: int = 16
    kv_cache_bytes: int = 2 * GiB
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes (tests use tiny pools)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # FuDG prefill role: every request leaves after its first token with its KV (RequestOutput.kv_payload).
    kv_export: bool = False


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    # The request's timestamps on the clock passed to `step` (services report queue time and TTFT).
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Set (with finish_reason "transferred") when the request left this engine after its prefill: its KV
    # and sampler state, for another engine's `import_request`.
    kv_payload: KvPayload | None = None


@dataclass
class EngineStats:
    policy: str
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    block_size: int
    max_model_len: int
    num_preemptions: int
    num_steps: int
    prefill_tokens_total: int
    generation_tokens_total: int
    # What the latest step computed (both 0 before the first step and after an empty one): its phase.
    last_step_prefill_tokens: int = 0
    last_step_decode_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Counters:
    steps: int = 0
    prefill_tokens: int = 0  # includes tokens recomputed after preemption
    generation_tokens: int = 0
    last_prefill_tokens: int = 0
    last_decode_tokens: int = 0


class LLMEngine:
    def __init__(self, model: torch.nn.Module, eos_token_ids: set[int], config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model = model
        self.eos_token_ids = frozenset(eos_token_ids)
        device = next(model.parameters()).device
        geometry = KVGeometry.from_model_config(model.config, next(model.parameters()).dtype)
        num_blocks = config.num_kv_blocks or geometry.blocks_for_budget(
            config.kv_cache_bytes, config.block_size
        )
        if num_blocks < 1:
            raise ValueError(
                f"KV budget of {config.kv_cache_bytes} bytes holds no block of {config.block_size} tokens "
                f"({geometry.bytes_per_token()} bytes per token)"
            )
        text_config = model.config.get_text_config()
        model_len = config.max_model_len or getattr(text_config, "max_position_embeddings", 4096)
        # One sequence must always fit in the pool, so a lone request can never be preempted forever.
        self.max_model_len = min(model_len, num_blocks * config.block_size)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.kv_cache = KVCache(geometry, num_blocks, config.block_size, device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.blocks,
            make_policy(config.policy),
        )
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler()
        self._counters = _Counters()
        self._request_ids: set[str] = set()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        config: EngineConfig | None = None,
    ) -> LLMEngine:
        from services.instance.engine.attention import ATTENTION_NAME
        from services.instance.models.loader import load_model, resolve_model_path

        folder = resolve_model_path(None if path is None else str(path), dtype=dtype)
        model = load_model(folder, dtype=dtype, device=device, attn_implementation=ATTENTION_NAME)
        return cls(model, eos_token_ids_of(model), config)

    # -- requests -------------------------------------------------------------------------------------------

    def validate_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ParameterError (naming the field) or ValueError for a request that cannot run. Read-only,
        so a frontend thread may call it before handing the request to the engine thread."""
        params.validate()
        if not isinstance(prompt_token_ids, list) or not prompt_token_ids:
            raise ParameterError("prompt", "must not be empty")
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ParameterError("prompt_token_ids", f"token id {t!r} is not in [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ParameterError(
                "prompt",
                f"the prompt has {len(prompt_token_ids)} tokens but the model's context is "
                f"{self.max_model_len} tokens, which leaves no room to generate",
            )
        if request_id in self._request_ids:
            raise ValueError(f"request_id {request_id!r} is already in use")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        *,
        export_kv: bool | None = None,
    ) -> None:
        """Queue a request. `export_kv` (default: the engine's `kv_export`) hands it out with its KV after
        its first token instead of decoding it here."""
        self.validate_request(request_id, prompt_token_ids, params)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            eos_token_ids=self.eos_token_ids,
            export_kv=self.config.kv_export if export_kv is None else export_kv,
        )
        self._request_ids.add(request_id)
        self.scheduler.add(seq)

    def import_request(
        self, payload: KvPayload, arrival_time: float | None = None, first_token_time: float | None = None
    ) -> bool:
        """Continue a request another engine prefilled (see kv_transfer.import_payload); times are on the
        clock passed to `step`. False when it had to queue for recomputation instead (no room for its KV)."""
        now = time.monotonic() if arrival_time is None else arrival_time
        return import_payload(self, payload, arrival_time=now, first_token_time=first_token_time)

    def register_request_id(self, request_id: str) -> None:
        self._request_ids.add(request_id)

    def abort_request(self, request_id: str, now: float | None = None) -> bool:
        seq = self.scheduler.abort(request_id, time.monotonic() if now is None else now)
        if seq is None:
            return False
        self._request_ids.discard(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- step -----------------------------------------------------------------------------------------------

    def step(self, now: float | None = None) -> list[RequestOutput]:
        now = time.monotonic() if now is None else now
        plan = self.scheduler.schedule(now)
        prefill_tokens = plan.num_prefill_tokens  # before postprocess turns prefills into decodes
        self._counters.last_prefill_tokens = prefill_tokens
        self._counters.last_decode_tokens = plan.num_tokens - prefill_tokens
        if plan.is_empty:
            return []
        result = self.runner.execute(plan)
        seqs = [c.seq for c in result.sampling_chunks]
        sampled = self.sampler(result.logits, seqs)
        tokens = {seq.request_id: tok for seq, tok in zip(seqs, sampled.token_ids, strict=True)}
        self.scheduler.postprocess(plan, tokens, now)
        self._counters.steps += 1
        self._counters.prefill_tokens += prefill_tokens
        self._counters.generation_tokens += len(seqs)
        outputs = []
        for seq, tok, lp in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            payload = self._export(seq) if seq.finish_reason is FinishReason.TRANSFERRED else None
            if seq.is_finished:
                self._request_ids.discard(seq.request_id)
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[tok],
                    new_logprobs=None if lp is None else [lp],
                    finished=seq.is_finished,
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    stop_reason=seq.stop_reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                    arrival_time=seq.arrival_time,
                    first_scheduled_time=seq.first_scheduled_time,
                    first_token_time=seq.first_token_time,
                    kv_payload=payload,
                )
            )
        return outputs

    def _export(self, seq: Sequence) -> KvPayload:
        start = time.perf_counter()
        try:
            payload = export_sequence(self.kv_cache, seq)
        finally:
            self.blocks.free(seq)  # whatever happens, a detached sequence's blocks return
        payload.export_seconds = time.perf_counter() - start
        return payload

    def stats(self) -> EngineStats:
        return EngineStats(
            policy=self.scheduler.policy.name,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            block_size=self.blocks.block_size,
            max_model_len=self.max_model_len,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._counters.steps,
            prefill_tokens_total=self._counters.prefill_tokens,
            generation_tokens_total=self._counters.generation_tokens,
            last_step_prefill_tokens=self._counters.last_prefill_tokens,
            last_step_decode_tokens=self._counters.last_decode_tokens,
        )


def eos_token_ids_of(model: torch.nn.Module) -> set[int]:
    """EOS ids as `generate` applies them: the model's generation_config (an id or a list of ids)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
