"""The engine's KvPayload ↔ the KvTransfer wire message (shared/kv_messages.py), both directions pure."""

from __future__ import annotations

from dataclasses import replace

from services.instance.engine.kv_transfer import KvPayload
from shared.kv_messages import KvLayout, KvTransfer
from shared.messages import DispatchRequest


def to_transfer(
    payload: KvPayload,
    request: DispatchRequest,
    *,
    prefill_instance_id: str,
    decode_instance_id: str,
    next_seq: int,
    queue_time: float | None,
    first_token_time: float | None,
    sent_at: float,
) -> KvTransfer:
    if payload.request_id != request.request_id or payload.prompt_token_ids != request.prompt_token_ids:
        raise ValueError(f"payload of {payload.request_id!r} does not belong to {request.request_id!r}")
    return KvTransfer(
        # The engine's own parameters (validated, normalised) travel, so both sides sample alike.
        request=replace(request, sampling=payload.sampling),
        prefill_instance_id=prefill_instance_id,
        decode_instance_id=decode_instance_id,
        output_token_ids=list(payload.output_token_ids),
        next_seq=next_seq,
        queue_time=queue_time,
        first_token_time=first_token_time,
        layout=KvLayout(
            dtype=payload.dtype,
            num_layers=payload.num_layers,
            num_tokens=payload.num_tokens,
            num_kv_heads=payload.num_kv_heads,
            head_dim=payload.head_dim,
        ),
        keys=payload.keys,
        values=payload.values,
        generator_state=payload.generator_state,
        export_seconds=payload.export_seconds,
        sent_at=sent_at,
    )


def payload_of(transfer: KvTransfer) -> KvPayload:
    """The engine payload a KvTransfer carries (the engine validates it again on import)."""
    request, layout = transfer.request, transfer.layout
    return KvPayload(
        request_id=request.request_id,
        prompt_token_ids=list(request.prompt_token_ids),
        output_token_ids=list(transfer.output_token_ids),
        sampling=dict(request.sampling),
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_tokens=layout.num_tokens,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        keys=list(transfer.keys),
        values=list(transfer.values),
        generator_state=transfer.generator_state,
        export_seconds=transfer.export_seconds,
    )
