"""The wire contract: every message round-trips; every malformed input is a WireError naming the problem."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from shared import keys, subjects
from shared.config import CoordinatorConfig, RouterConfig
from shared.messages import (
    AbortRequest,
    AdminReply,
    AdminRequest,
    ClusterChanged,
    DeregisterInstance,
    DispatchAck,
    DispatchRequest,
    ErrorReply,
    InstanceControl,
    InstanceInfo,
    InstanceLost,
    InstanceStatus,
    PrefillWindow,
    RegisterAck,
    RegisterInstance,
    RemoteError,
    RequestProgress,
    SubmitAck,
    SubmitRequest,
    TokenBatch,
    TokenChunk,
    TokenLogprob,
    decode_reply,
    decode_token_chunks,
)
from shared.wire import PROTOCOL_VERSION, Message, WireError, decode, encode, message_types

SUBMIT = SubmitRequest(
    request_id="req-1",
    model="smollm2",
    prompt_token_ids=[1, 2, 3],
    sampling={"max_tokens": 8, "temperature": 0.0, "stop": ["\n"], "logprobs": None},
    reply_subject="ecoserve.router.r1.tokens",
    router_id="r1",
    arrival_time=1_700_000_000.25,
    stream=True,
)
LOGPROB = TokenLogprob(token_id=7, logprob=-0.5, rank=2, top_ids=[3, 7], top_logprobs=[-0.2, -0.5])
INFO = InstanceInfo(
    instance_id="i0",
    model="smollm2",
    subjects=subjects.instance_subjects("ecoserve", "i0"),
    kv_blocks_total=512,
    block_size=16,
    max_model_len=2048,
    policy="padg",
    pid=1234,
    host="localhost",
    started_at=1_700_000_000.0,
)
PROGRESS = RequestProgress(request_id="req-1", prompt_tokens=3, output_tokens=2, arrival_time=1.5)
CHUNK = TokenChunk(
    request_id="req-1", seq=0, token_ids=[42], finished=False, prompt_tokens=3, completion_tokens=1
)
LAST_CHUNK = TokenChunk(
    request_id="req-1",
    seq=3,
    token_ids=[7],
    finished=True,
    prompt_tokens=3,
    completion_tokens=4,
    logprobs=[LOGPROB],
    finish_reason="stop",
    stop_reason="\n",
    queue_time=0.01,
    first_token_time=1_700_000_000.75,
)
STATUS = InstanceStatus(
    instance_id="i0",
    seq=9,
    time=1_700_000_001.0,
    state="ready",
    phase="decode",
    num_running=1,
    num_waiting=0,
    kv_blocks_free=500,
    kv_blocks_total=512,
    num_preemptions=0,
    requests=[PROGRESS, RequestProgress(request_id="r2", prompt_tokens=1, output_tokens=0, arrival_time=2.0)],
)
ERROR = ErrorReply(code="overloaded", message="queue full", retry_after=0.5)
DISPATCH = DispatchRequest.from_submit(SUBMIT, instance_id="i0", dispatch_time=1_700_000_000.5)

SAMPLES: list[Message] = [
    SUBMIT,
    SubmitAck(request_id="req-1", instance_id="i0"),
    DISPATCH,
    DispatchAck(request_id="req-1", instance_id="i0", accepted=False, reason="draining"),
    LOGPROB,
    CHUNK,
    LAST_CHUNK,
    TokenChunk(
        request_id="r",
        seq=1,
        token_ids=[],
        finished=True,
        prompt_tokens=1,
        completion_tokens=0,
        stop_reason=2,
    ),
    TokenBatch(chunks=[CHUNK, LAST_CHUNK]),
    AbortRequest(request_ids=["req-1", "req-2"], reason="client disconnected"),
    subjects.instance_subjects("ecoserve", "i0"),
    INFO,
    RegisterInstance(info=INFO),
    dataclasses.replace(INFO, role="prefill"),
    DispatchRequest.from_submit(SUBMIT, instance_id="p0", dispatch_time=2.0, decode_instance_id="d0"),
    RegisterAck(accepted=True, macro_instance_id="m0", lease_seconds=3.0, message="welcome"),
    PROGRESS,
    STATUS,
    DeregisterInstance(instance_id="i0", reason="shutdown"),
    ClusterChanged(reason="split", time=1.0, macro_instance_id="m1"),
    InstanceControl(command="drain", args={"timeout": 5.0}),
    PrefillWindow(active=True, epoch=7, time=3.0, ttft_slo=1.5, hold_outputs=True),
    InstanceLost(instance_id="i-1", reason="lease expired", time=2.0),
    ERROR,
    AdminRequest(command="scale", args={"macro_instance_id": "m0", "delta": 1, "nested": {"a": [1, 2.5]}}),
    AdminReply(ok=True, result={"instances": ["i0", "i1"]}),
]


def raw(msg: Message) -> dict[str, Any]:
    """The wire map of a valid message, to corrupt."""
    return msgpack.unpackb(encode(msg))


def nested(msg: Message) -> dict[str, Any]:
    """The wire map of a message nested inside another: no version or type of its own."""
    return {key: value for key, value in raw(msg).items() if key not in ("v", "type")}


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def test_every_catalogue_message_has_a_round_trip_sample() -> None:
    catalogue = {name for name, cls in message_types().items() if cls.__module__ == "shared.messages"}
    assert catalogue == {type(sample).__name__ for sample in SAMPLES}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    wire = msgpack.unpackb(data)
    assert wire["v"] == PROTOCOL_VERSION
    assert wire["type"] == type(msg).__name__
    back = decode(data, type(msg))
    assert type(back) is type(msg)
    assert back == msg


def test_int_is_accepted_for_float_and_becomes_float() -> None:
    data = packed({**raw(SUBMIT), "arrival_time": 12})
    decoded = decode(data, SubmitRequest)
    assert decoded.arrival_time == 12.0
    assert type(decoded.arrival_time) is float


def test_omitted_optional_fields_take_their_defaults() -> None:
    wire = raw(CHUNK)
    for name in ("logprobs", "finish_reason", "stop_reason", "error", "queue_time", "first_token_time"):
        del wire[name]
    assert decode(packed(wire)) == CHUNK


def test_decoded_message_is_frozen() -> None:
    decoded = decode(encode(SUBMIT), SubmitRequest)
    with pytest.raises(AttributeError):
        decoded.request_id = "other"  # type: ignore[misc]


def _chunk_with(**changes: Any) -> bytes:
    return packed({**raw(LAST_CHUNK), **changes})


def _logprob_with(**changes: Any) -> bytes:
    return _chunk_with(logprobs=[{**nested(LOGPROB), **changes}])


def _without(msg: Message, name: str) -> bytes:
    wire = raw(msg)
    del wire[name]
    return packed(wire)


def _info_without(name: str) -> bytes:
    wire = raw(RegisterInstance(info=INFO))
    del wire["info"][name]
    return packed(wire)


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


REJECTIONS = [
    # (case, data, expected message (substring), expected field path)
    ("not msgpack", b"\xc1\x00", "not a valid msgpack message", None),
    ("truncated", encode(SUBMIT)[:-4], "not a valid msgpack message", None),
    ("trailing bytes", encode(SUBMIT) + b"\x00", "not a valid msgpack message", None),
    ("empty", b"", "not a valid msgpack message", None),
    ("invalid utf-8", b"\x81\xa1v\xa2\xff\xfe", "not a valid msgpack message", None),
    ("int map key", packed({1: 2}), "not a valid msgpack message", None),
    ("not a map", packed([1, 2]), "expected a msgpack map, got list", None),
    (
        "no version",
        packed({"type": "SubmitAck", "request_id": "r", "instance_id": "i"}),
        "missing protocol",
        None,
    ),
    ("future version", packed({**raw(SUBMIT), "v": 2}), "unsupported protocol version 2", None),
    ("bool version", packed({**raw(SUBMIT), "v": True}), "unsupported protocol version True", None),
    ("str version", packed({**raw(SUBMIT), "v": "1"}), "unsupported protocol version '1'", None),
    ("deep version", packed({**raw(SUBMIT), "v": _deep(1000)}), "unsupported protocol version a list", None),
    ("deep type", packed({**raw(SUBMIT), "type": _deep(1000)}), "unknown message type a list", None),
    ("no type", packed({"v": 1, "request_id": "r"}), "missing message type", None),
    ("unknown type", packed({**raw(SUBMIT), "type": "Bogus"}), "unknown message type 'Bogus'", None),
    ("non-str type", packed({**raw(SUBMIT), "type": 3}), "unknown message type 3", None),
    (
        "missing field",
        _without(SUBMIT, "prompt_token_ids"),
        "SubmitRequest.prompt_token_ids: missing",
        "prompt_token_ids",
    ),
    ("missing nested", _info_without("subjects"), "RegisterInstance.info.subjects: missing", "info.subjects"),
    ("str for int", _chunk_with(seq="5"), "TokenChunk.seq: expected int, got str", "seq"),
    (
        "bool for int",
        _chunk_with(prompt_tokens=True),
        "TokenChunk.prompt_tokens: expected int, got bool",
        "prompt_tokens",
    ),
    ("float for int", _chunk_with(seq=1.0), "TokenChunk.seq: expected int, got float", "seq"),
    ("int for bool", _chunk_with(finished=1), "TokenChunk.finished: expected bool, got int", "finished"),
    (
        "None for str",
        _chunk_with(request_id=None),
        "TokenChunk.request_id: expected str, got None",
        "request_id",
    ),
    (
        "str for float",
        _chunk_with(queue_time="0.1"),
        "TokenChunk.queue_time: expected float | None, got str",
        "queue_time",
    ),
    (
        "bool in list",
        _chunk_with(token_ids=[1, True]),
        "TokenChunk.token_ids[1]: expected int, got bool",
        "token_ids[1]",
    ),
    (
        "str for list",
        _chunk_with(token_ids="12"),
        "TokenChunk.token_ids: expected list[int], got str",
        "token_ids",
    ),
    (
        "union",
        _chunk_with(stop_reason=1.5),
        "TokenChunk.stop_reason: expected int | str | None, got float",
        "stop_reason",
    ),
    (
        "nested int",
        _logprob_with(rank="1"),
        "TokenChunk.logprobs[0].rank: expected int, got str",
        "logprobs[0].rank",
    ),
    (
        "nested list item",
        _logprob_with(top_logprobs=[-1.0, "x"]),
        "TokenChunk.logprobs[0].top_logprobs[1]: expected float, got str",
        "logprobs[0].top_logprobs[1]",
    ),
    (
        "nested unknown",
        _logprob_with(extra=1),
        "TokenChunk.logprobs[0].extra: unknown field",
        "logprobs[0].extra",
    ),
    (
        "nested not a map",
        packed({**raw(RegisterInstance(info=INFO)), "info": [1]}),
        "expected InstanceInfo, got list",
        "info",
    ),
    ("unknown field", _chunk_with(priority=1), "TokenChunk.priority: unknown field", "priority"),
    (
        "literal",
        packed({**raw(STATUS), "state": "dead"}),
        "InstanceStatus.state: expected one of 'starting'",
        "state",
    ),
    ("literal type", packed({**raw(ERROR), "code": 5}), "ErrorReply.code: expected one of", "code"),
    (
        "dict for list",
        packed({**raw(STATUS), "requests": {}}),
        "expected list[RequestProgress], got dict",
        "requests",
    ),
    (
        "list of nested",
        packed({**raw(STATUS), "requests": [nested(PROGRESS) | {"output_tokens": -0.5}]}),
        "InstanceStatus.requests[0].output_tokens: expected int, got float",
        "requests[0].output_tokens",
    ),
    (
        "bytes dict key",
        packed({**raw(SUBMIT), "sampling": {b"max_tokens": 1}}),
        "SubmitRequest.sampling: expected str keys",
        "sampling",
    ),
    (
        "list for dict",
        packed({**raw(SUBMIT), "sampling": []}),
        "expected dict[str, any], got list",
        "sampling",
    ),
]


@pytest.mark.parametrize(("case", "data", "message", "field"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejection_names_the_problem(case: str, data: bytes, message: str, field: str | None) -> None:
    with pytest.raises(WireError) as caught:
        decode(data)
    assert message in str(caught.value)
    assert caught.value.field == field


def test_bytes_field_name_is_unknown_not_a_crash() -> None:
    wire: dict[Any, Any] = raw(CHUNK)
    wire[b"seq2"] = 1
    with pytest.raises(WireError, match=r"TokenChunk\[b'seq2'\]: unknown field"):
        decode(packed(wire))


def test_unexpected_type_is_rejected() -> None:
    data = encode(CHUNK)
    with pytest.raises(WireError, match="expected SubmitRequest, got TokenChunk"):
        decode(data, SubmitRequest)
    with pytest.raises(WireError, match="expected SubmitAck or ErrorReply, got TokenChunk"):
        decode(data, (SubmitAck, ErrorReply))
    # A DispatchRequest carries every SubmitRequest field, but it is not a SubmitRequest.
    with pytest.raises(WireError, match="expected SubmitRequest, got DispatchRequest"):
        decode(encode(DISPATCH), SubmitRequest)


def test_decode_reply_returns_the_reply_or_raises_the_remote_error() -> None:
    ack = SubmitAck(request_id="r", instance_id="i")
    assert decode_reply(encode(ack), SubmitAck) == ack
    error = ErrorReply(code="unavailable", message="no instance", retry_after=1.0)
    with pytest.raises(RemoteError) as caught:
        decode_reply(encode(error), SubmitAck)
    assert caught.value.reply == error
    assert caught.value.code == "unavailable"
    with pytest.raises(WireError, match="expected SubmitAck or ErrorReply"):
        decode_reply(encode(CHUNK), SubmitAck)


def test_error_reply_from_wire_error_keeps_the_field() -> None:
    with pytest.raises(WireError) as caught:
        decode(_chunk_with(seq="x"))
    reply = ErrorReply.from_wire_error(caught.value)
    assert (reply.code, reply.field) == ("bad_message", "seq")
    assert "TokenChunk.seq" in reply.message


def test_encode_failures() -> None:
    bad = AdminRequest(command="x", args={"ids": {1, 2}})  # a set has no msgpack form
    with pytest.raises(WireError, match="cannot encode AdminRequest"):
        encode(bad)
    assert decode(encode(SUBMIT)) == SUBMIT  # the failed pack left nothing behind in the packer
    with pytest.raises(TypeError, match="not a registered Message"):
        encode({"v": 1})  # type: ignore[arg-type]


def test_message_type_names_are_unique() -> None:
    with pytest.raises(TypeError, match="already used"):

        @dataclass(frozen=True, kw_only=True)
        class TokenChunk(Message):  # the same wire name as the catalogue's
            x: int


def test_unsupported_annotation_is_reported_on_first_use() -> None:
    @dataclass(frozen=True, kw_only=True)
    class _WireTestSetField(Message):
        items: set[int]

    with pytest.raises(TypeError, match="unsupported wire field type"):
        encode(_WireTestSetField(items={1}))


# ---- fuzzing: nothing but WireError may escape decode ---------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), rng.random()])
    if kind == 4:
        return rng.choice(["", "v", "type", "seq", "ready", "TokenChunk", "\u00e9\u4e2d", "x" * 40])
    if kind == 5:
        return rng.randbytes(rng.randrange(4))
    if kind == 6:
        if rng.random() < 0.5:
            return msgpack.Timestamp(rng.randrange(-(2**33), 2**33), rng.randrange(10**9))
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(5)))
    if kind in (7, 8):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_key(rng: random.Random) -> Any:
    return rng.choice(["v", "type", "seq", "token_ids", "info", "x", b"bin", "requests", "logprobs"])


def _mutate(rng: random.Random, wire: Any, depth: int = 0) -> Any:
    """Change one thing somewhere inside a valid wire value."""
    if isinstance(wire, dict) and wire and rng.random() < 0.7:
        key = rng.choice(list(wire))
        action = rng.randrange(4)
        if action == 0:
            del wire[key]
        elif action == 1:
            wire[_random_key(rng)] = _random_value(rng)
        elif action == 2 and depth < 4:
            wire[key] = _mutate(rng, wire[key], depth + 1)
        else:
            wire[key] = _random_value(rng)
        return wire
    if isinstance(wire, list) and wire and rng.random() < 0.7:
        index = rng.randrange(len(wire))
        wire[index] = _mutate(rng, wire[index], depth + 1) if depth < 4 else _random_value(rng)
        return wire
    return _random_value(rng)


def _decode_or_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(data)


def test_fuzz_random_bytes() -> None:
    rng = random.Random(1)
    valid = [encode(sample) for sample in SAMPLES]
    for _ in range(3000):
        _decode_or_wire_error(rng.randbytes(rng.randrange(64)))
    for _ in range(3000):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        _decode_or_wire_error(bytes(data))


def test_fuzz_random_msgpack_values() -> None:
    rng = random.Random(2)
    for _ in range(2000):
        _decode_or_wire_error(packed(_random_value(rng)))
    decoded_ok = 0
    for _ in range(4000):
        sample = rng.choice(SAMPLES)
        wire = _mutate(rng, raw(sample))
        try:
            decode(packed(wire))
            decoded_ok += 1
        except WireError:
            pass
    assert decoded_ok < 4000  # the mutations do reach the validator's rejections


# ---- subject names, key layout and configuration: the other halves of the contract ---------------------


def test_subject_and_key_names() -> None:
    assert subjects.instance_requests("ecoserve", "i0") == "ecoserve.instance.i0.requests"
    assert subjects.router_tokens("staging.eco", "r-1") == "staging.eco.router.r-1.tokens"
    assert subjects.submit("ecoserve") == "ecoserve.submit"
    assert subjects.submit("ecoserve", "m0") == "ecoserve.submit.m0"
    assert keys.instance_lease("ecoserve", "i0") == "ecoserve:instance:i0:lease"
    assert keys.macro_members("ecoserve", "m0") == "ecoserve:macro:m0:members"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "a:b", "a\n", "x" * 129])
def test_ids_that_would_break_subjects_or_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid instance_id"):
        subjects.instance_abort("ecoserve", bad)
    with pytest.raises(ValueError, match="invalid instance_id"):
        keys.instance_lease("ecoserve", bad)


def test_bad_prefix_is_refused() -> None:
    for bad in ("", "a..b", "eco.*", "eco serve"):
        with pytest.raises(ValueError, match="prefix"):
            subjects.status_all(bad)


def test_config_flags_default_to_environment() -> None:
    parser = argparse.ArgumentParser()
    environ = {"ECOSERVE_PORT": "9001", "ECOSERVE_API_KEY": "secret", "ECOSERVE_PREFIX": "t1"}
    RouterConfig.add_arguments(parser, environ)
    CoordinatorConfig.add_arguments(parser, environ)  # shares --nats-url etc. with the router's flags
    args = parser.parse_args(["--prefix", "t2", "--router-id", "r7"])
    router = RouterConfig.from_args(args)
    assert (router.port, router.api_key, router.prefix, router.router_id) == (9001, "secret", "t2", "r7")
    assert "secret" not in repr(router)
    assert "secret" not in parser.format_help()
    assert CoordinatorConfig.from_args(args).lease_seconds == 3.0
    with pytest.raises(ValueError, match="ECOSERVE_PORT='x'"):
        RouterConfig.add_arguments(argparse.ArgumentParser(), {"ECOSERVE_PORT": "x"})
    with pytest.raises(ValueError, match="invalid router_id"):
        RouterConfig(router_id="a.b")


def test_a_token_subject_carries_a_chunk_or_a_batch_of_chunks() -> None:
    assert decode_token_chunks(encode(CHUNK)) == [CHUNK]
    assert decode_token_chunks(encode(TokenBatch(chunks=[CHUNK, LAST_CHUNK]))) == [CHUNK, LAST_CHUNK]
    with pytest.raises(WireError, match="AbortRequest"):
        decode_token_chunks(encode(AbortRequest(request_ids=["r"], reason="x")))
    with pytest.raises(WireError, match="chunks"):
        decode_token_chunks(packed({"v": 1, "type": "TokenBatch", "chunks": [{"request_id": 3}]}))
