"""The message catalogue: every message the services exchange over NATS, and who sends it to whom.

Optional fields default to None so a sender may leave them out; everything else is required on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from shared.wire import Message, WireError, decode

InstanceState = Literal["starting", "ready", "draining", "stopping"]
FudgRole = Literal["mixed", "prefill", "decode"]  # FuDG: "mixed" serves whole requests (every other strategy)
ErrorCode = Literal["bad_request", "not_found", "overloaded", "unavailable", "internal", "bad_message"]

R = TypeVar("R", bound=Message)


# ---- requests and their tokens --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _RequestFields:
    # Shared by SubmitRequest and DispatchRequest without making one a subclass of the other, so a decode
    # that expects a SubmitRequest never accepts a DispatchRequest.
    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # SamplingParams fields; the engine validates them, the wire only the shape
    reply_subject: str  # where the instance publishes this request's TokenChunks
    router_id: str
    arrival_time: float  # unix seconds at the router
    stream: bool


@dataclass(frozen=True, kw_only=True)
class SubmitRequest(_RequestFields, Message):
    """Router → coordinator (request/reply): run this request; answered by SubmitAck or ErrorReply."""


@dataclass(frozen=True, kw_only=True)
class SubmitAck(Message):
    """Coordinator → router: the request was dispatched to `instance_id` (where aborts go)."""

    request_id: str
    instance_id: str


@dataclass(frozen=True, kw_only=True)
class DispatchRequest(_RequestFields, Message):
    """Coordinator → instance (request/reply): schedule this request; answered by DispatchAck."""

    instance_id: str
    dispatch_time: float  # unix seconds at the coordinator
    # FuDG: the decode instance the prefill instance `instance_id` hands the request to after its first token
    # (None: decode where it is prefilled).
    decode_instance_id: str | None = None

    @classmethod
    def from_submit(
        cls,
        submit: SubmitRequest,
        *,
        instance_id: str,
        dispatch_time: float,
        decode_instance_id: str | None = None,
    ) -> DispatchRequest:
        return cls(
            **submit.__dict__,
            instance_id=instance_id,
            dispatch_time=dispatch_time,
            decode_instance_id=decode_instance_id,
        )


@dataclass(frozen=True, kw_only=True)
class DispatchAck(Message):
    """Instance → coordinator: whether the instance took the request (`reason` says why not)."""

    request_id: str
    instance_id: str
    accepted: bool
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class TokenLogprob(Message):
    """Nested in TokenChunk: one generated token's logprob, rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True, kw_only=True)
class TokenChunk(Message):
    """Instance → router (on the request's reply_subject): the tokens of one engine step for one request."""

    request_id: str
    seq: int  # 0, 1, 2, … per request: a gap means a lost chunk
    token_ids: list[int]
    finished: bool
    prompt_tokens: int
    completion_tokens: int  # generated so far, including this chunk
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    error: str | None = None
    queue_time: float | None = None  # seconds from arrival to first schedule
    first_token_time: float | None = None  # unix seconds


@dataclass(frozen=True, kw_only=True)
class TokenBatch(Message):
    """Instance → router: one engine step's TokenChunks for the requests that router owns, in one message
    (one publish, one delivery and one decode per router per step instead of per request). An instance sends
    a lone chunk as a plain TokenChunk."""

    chunks: list[TokenChunk]


def decode_token_chunks(data: bytes | bytearray | memoryview) -> list[TokenChunk]:
    """The chunks of a message on a router's token subject (a TokenChunk or a TokenBatch); WireError if it
    is neither."""
    message = decode(data, (TokenChunk, TokenBatch))
    return message.chunks if isinstance(message, TokenBatch) else [message]  # type: ignore[list-item]


@dataclass(frozen=True, kw_only=True)
class AbortRequest(Message):
    """Router → instance: stop these requests and free their KV blocks (client gone, stop string hit…)."""

    request_ids: list[str]
    reason: str


# ---- instance registry and status -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstanceSubjects(Message):
    """Nested in InstanceInfo: the NATS subjects an instance listens on."""

    requests: str  # DispatchRequest
    abort: str  # AbortRequest
    control: str  # coordinator commands (phase changes, drain)


@dataclass(frozen=True, kw_only=True)
class InstanceInfo(Message):
    """Nested in RegisterInstance: what the coordinator needs to know to schedule onto an instance."""

    instance_id: str
    model: str
    subjects: InstanceSubjects
    kv_blocks_total: int
    block_size: int  # tokens per KV block
    max_model_len: int
    policy: str  # intra-instance policy: "nodg", "sarathi", "padg", …
    pid: int
    host: str
    started_at: float  # unix seconds
    # shared.prefill_profile.PrefillProfile.to_dict(): measured prefill seconds by prompt length, for the
    # PaDG admission check. None when the instance did not profile (NoDG/Sarathi clusters need none).
    prefill_profile: dict[str, Any] | None = None
    # FuDG: "prefill" instances hand every request to a "decode" instance after its first token.
    role: FudgRole = "mixed"


@dataclass(frozen=True, kw_only=True)
class RegisterInstance(Message):
    """Instance → coordinator (request/reply): join the cluster; answered by RegisterAck."""

    info: InstanceInfo


@dataclass(frozen=True, kw_only=True)
class RegisterAck(Message):
    """Coordinator → instance: accepted into `macro_instance_id`; heartbeats must come within the lease."""

    accepted: bool
    macro_instance_id: str | None  # None when not accepted
    lease_seconds: float
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class RequestProgress(Message):
    """Nested in InstanceStatus: one running or waiting request's progress."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    arrival_time: float  # unix seconds
    first_token_time: float | None = None  # unix seconds; None until prefilled


@dataclass(frozen=True, kw_only=True)
class InstanceStatus(Message):
    """Instance → coordinator, every step or every few ms: queues, KV memory, phase; doubles as heartbeat."""

    instance_id: str
    seq: int  # per instance, so the coordinator notices lost reports
    time: float  # unix seconds
    state: InstanceState
    phase: str  # "prefill" | "decode" | "idle" (policy-defined)
    num_running: int
    num_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    num_preemptions: int  # cumulative
    requests: list[RequestProgress]
    prefill_window: bool | None = None  # padg policy: whether the prefill window is open (None: other policy)
    window_epoch: int = 0  # the epoch of the latest PrefillWindow applied (0: none yet)


@dataclass(frozen=True, kw_only=True)
class DeregisterInstance(Message):
    """Instance → coordinator: leaving the cluster (shutdown or drained)."""

    instance_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ClusterChanged(Message):
    """Coordinator → routers (broadcast): the macro-instance table in Redis changed; re-read it."""

    reason: str
    time: float  # unix seconds
    macro_instance_id: str | None = None  # the macro instance that changed, when only one did


ControlCommand = Literal["register", "drain", "resume", "shutdown"]


@dataclass(frozen=True, kw_only=True)
class InstanceControl(Message):
    """Coordinator → instance (request/reply on its control subject): `register` again (the coordinator lost
    it), `drain` (take no new requests, finish held ones), `resume`, or `shutdown` (drain, deregister, exit).
    Answered by AdminReply."""

    command: ControlCommand
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PrefillWindow(Message):
    """Coordinator → instance (request/reply on its control subject, like InstanceControl): open (`active`)
    or close the instance's PaDG prefill window. Answered by AdminReply.

    `epoch` grows with every activation change of the macro instance (persisted with its state, so it keeps
    growing across coordinator restarts); an instance ignores a PrefillWindow whose epoch is below the last
    one it applied, so a late or retried message cannot undo a newer change. With `hold_outputs` the
    instance buffers output tokens while its window is open, releasing them at the latest `ttft_slo`
    seconds after it opened (EcoServe's output hold)."""

    active: bool
    epoch: int
    time: float  # unix seconds when the coordinator decided
    ttft_slo: float  # seconds
    hold_outputs: bool = False


@dataclass(frozen=True, kw_only=True)
class InstanceLost(Message):
    """Coordinator → routers (broadcast): the instance stopped heartbeating; end its requests' streams with
    an error now (routers know which of their requests it held from SubmitAck)."""

    instance_id: str
    reason: str
    time: float  # unix seconds


# ---- errors and administration --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ErrorReply(Message):
    """Any responder → requester: sent instead of the normal reply when a request fails."""

    code: ErrorCode
    message: str
    field: str | None = None  # the offending field path, for bad_request and bad_message
    retry_after: float | None = None  # seconds, for overloaded and unavailable

    @classmethod
    def from_wire_error(cls, error: WireError) -> ErrorReply:
        """The answer to a request that failed to decode."""
        return cls(code="bad_message", message=error.message, field=error.field)


class RemoteError(Exception):
    """The peer answered with an ErrorReply; `reply` carries it."""

    def __init__(self, reply: ErrorReply):
        detail = f" (field {reply.field})" if reply.field else ""
        super().__init__(f"{reply.code}: {reply.message}{detail}")
        self.reply = reply
        self.code = reply.code


def decode_reply(data: bytes | bytearray | memoryview, expected: type[R]) -> R:
    """The expected reply, or RemoteError if the peer sent an ErrorReply (WireError if neither)."""
    reply = decode(data, (expected, ErrorReply))
    if isinstance(reply, ErrorReply) and expected is not ErrorReply:
        raise RemoteError(reply)
    assert isinstance(reply, expected)
    return reply


@dataclass(frozen=True, kw_only=True)
class AdminRequest(Message):
    """Operator tool → coordinator (request/reply): run an admin command; answered by AdminReply."""

    command: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AdminReply(Message):
    """Coordinator → operator tool: the command's result, or why it failed."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
