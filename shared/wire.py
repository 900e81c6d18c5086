"""Msgpack encoding of message dataclasses, with a protocol version and strict validation on decode.

A message type is a dataclass subclassing `Message`; its class name is its wire name. On the wire a message
is one msgpack map: `{"v": PROTOCOL_VERSION, "type": name, <field>: <value>, ...}`; nested messages are plain
maps of their fields (their type is known from the annotation). `decode` checks everything a peer could get
wrong and raises `WireError` naming the field path, so a service can answer a bad message instead of crashing.

Supported field annotations: str, int, float, bool, bytes, None, X | Y unions, Literal[...] of str/int,
list[X], dict[str, X], Any, and nested Message types. Fields with a default may be omitted on the wire.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar, overload

import msgpack

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
_RESERVED_FIELDS = frozenset({"v", "type"})

M = TypeVar("M", bound="Message")


class WireError(ValueError):
    """A message could not be encoded or decoded; `field` is the offending field path when there is one."""

    def __init__(self, message: str, *, field: str | None = None, type_name: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.type_name = type_name


class Message:
    """Base of every wire message; subclasses must be dataclasses (conventionally frozen, kw_only)."""

    _registry: ClassVar[dict[str, type[Message]]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        existing = Message._registry.get(cls.__name__)
        # The same class defined again (module reload) replaces itself; two different classes cannot share a
        # wire name, or a receiver could not tell them apart.
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise TypeError(
                f"message type name {cls.__name__!r} is already used by {existing.__module__}."
                f"{existing.__qualname__}"
            )
        Message._registry[cls.__name__] = cls
        if existing is not None:
            _SPECS.pop(existing, None)


def message_types() -> dict[str, type[Message]]:
    """Wire name → class, for every Message subclass imported so far."""
    return dict(Message._registry)


# ---- validation machinery -------------------------------------------------------------------------------


class _Mismatch(Exception):
    """Raised inside the validators; `path` collects segments innermost first while it unwinds."""

    def __init__(self, problem: str, path: list[str] | None = None):
        super().__init__(problem)
        self.problem = problem
        self.path = path if path is not None else []


# A validator is (exact, check): values whose type is in `exact` pass untouched (the hot path, no call);
# anything else goes through `check`, which returns the (possibly converted) value or raises _Mismatch.
_Check = Callable[[Any], Any]
_Validator = tuple[frozenset[type], _Check]

_MISSING: Any = object()
_REQUIRED: Any = object()


def _got(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _show(value: Any) -> str:
    # Only scalars are shown by value: the repr of a peer's deeply nested list could exhaust the stack.
    if value is None or type(value) in (str, int, float, bool, bytes):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__name__}"


def _describe(tp: Any) -> str:
    if tp is type(None) or tp is None:
        return "None"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin is list:
        return f"list[{_describe(typing.get_args(tp)[0])}]"
    if origin is dict:
        return f"dict[str, {_describe(typing.get_args(tp)[1])}]"
    return getattr(tp, "__name__", repr(tp))


def _fail(expected: str) -> _Check:
    def check(value: Any) -> Any:
        raise _Mismatch(f"expected {expected}, got {_got(value)}")

    return check


def _check_float(value: Any) -> float:
    # msgpack keeps 3 and 3.0 apart; a sender that wrote an int where a float is due is still right.
    if type(value) is int:
        return float(value)
    raise _Mismatch(f"expected float, got {_got(value)}")


def _identity(value: Any) -> Any:
    return value


def _literal_validator(tp: Any) -> _Validator:
    allowed = typing.get_args(tp)
    for arg in allowed:
        if type(arg) not in (str, int):
            raise TypeError(f"Literal values must be str or int, got {arg!r}")
    allowed_keys = frozenset((type(arg), arg) for arg in allowed)  # (type, value): True must not match 1
    description = _describe(tp)

    def check(value: Any) -> Any:
        if type(value) in (str, int) and (type(value), value) in allowed_keys:
            return value
        shown = _show(value) if type(value) in (str, int) else _got(value)
        raise _Mismatch(f"expected {description}, got {shown}")

    return frozenset(), check


def _union_validator(tp: Any) -> _Validator:
    members = typing.get_args(tp)
    validators = [_validator(arg) for arg in members]
    exact = frozenset().union(*(v[0] for v in validators))
    fallible = [v[1] for arg, v in zip(members, validators, strict=True) if arg is not type(None)]
    description = _describe(tp)
    if len(fallible) == 1:
        # `X | None`: None is in `exact`, so anything reaching here is X's business; a mismatch deeper inside
        # X keeps its own path and message.
        (member_check,) = fallible

        def check_optional(value: Any) -> Any:
            try:
                return member_check(value)
            except _Mismatch as mismatch:
                if mismatch.path:
                    raise
                raise _Mismatch(f"expected {description}, got {_got(value)}") from None

        return exact, check_optional

    def check(value: Any) -> Any:
        for member_check in fallible:
            try:
                return member_check(value)
            except _Mismatch:
                continue
        raise _Mismatch(f"expected {description}, got {_got(value)}")

    return exact, check


def _list_validator(tp: Any) -> _Validator:
    item_exact, item_check = _validator(typing.get_args(tp)[0])
    description = _describe(tp)

    def check(value: Any) -> Any:
        if type(value) is not list:
            raise _Mismatch(f"expected {description}, got {_got(value)}")
        # One C-level pass for the common all-scalar case (token id lists run to thousands of items).
        if item_exact and set(map(type, value)) <= item_exact:
            return value
        for index, item in enumerate(value):
            if type(item) in item_exact:
                continue
            try:
                value[index] = item_check(item)
            except _Mismatch as mismatch:
                mismatch.path.append(f"[{index}]")
                raise
        return value

    return frozenset(), check


def _dict_validator(tp: Any) -> _Validator:
    key_type, value_type = typing.get_args(tp)
    if key_type is not str:
        raise TypeError(f"dict keys must be str on the wire, got {tp}")
    any_value = value_type is Any
    value_exact, value_check = _validator(value_type)
    description = _describe(tp)

    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _Mismatch(f"expected {description}, got {_got(value)}")
        for key in value:
            if type(key) is not str:
                raise _Mismatch(f"expected str keys, got {_got(key)} key {_show(key)}")
        if any_value:
            return value
        for key, item in value.items():
            if type(item) in value_exact:
                continue
            try:
                value[key] = value_check(item)
            except _Mismatch as mismatch:
                mismatch.path.append(f"[{_show(key)}]")
                raise
        return value

    return frozenset(), check


def _message_validator(cls: type[Message]) -> _Validator:
    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _Mismatch(f"expected {cls.__name__}, got {_got(value)}")
        return _build(_spec(cls), value)

    return frozenset(), check


def _validator(tp: Any) -> _Validator:
    if tp is Any:
        return frozenset(), _identity
    if tp is None or tp is type(None):
        return frozenset({type(None)}), _fail("None")
    if tp is float:
        return frozenset({float}), _check_float
    if tp in (str, int, bool, bytes):
        # `type(v) is int` keeps bool out of int fields (bool subclasses int in Python, not on the wire).
        return frozenset({tp}), _fail(tp.__name__)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union_validator(tp)
    if origin is Literal:
        return _literal_validator(tp)
    if origin is list:
        return _list_validator(tp)
    if origin is dict:
        return _dict_validator(tp)
    if isinstance(tp, type) and issubclass(tp, Message):
        return _message_validator(tp)
    raise TypeError(f"unsupported wire field type {tp!r}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    cls: type[Message]
    name: str
    fields: tuple[tuple[str, frozenset[type], _Check, Any], ...]  # name, exact, check, default factory
    names: frozenset[str]


_SPECS: dict[type, _Spec] = {}


def _spec(cls: type[Message]) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = _compile(cls)
    return spec


def _compile(cls: type[Message]) -> _Spec:
    # Compiled on first use: at class creation the dataclass decorator has not run yet, and annotations may
    # name message types defined further down the module.
    if Message._registry.get(cls.__name__) is not cls:
        raise TypeError(f"{cls.__qualname__} is not a registered Message subclass")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"message type {cls.__name__} must be a dataclass")
    if "__slots__" in cls.__dict__:
        raise TypeError(f"message type {cls.__name__} must not use slots (decode fills __dict__ directly)")
    hints = typing.get_type_hints(cls)
    compiled = []
    for field in dataclasses.fields(cls):
        if field.name in _RESERVED_FIELDS:
            raise TypeError(f"{cls.__name__}.{field.name}: the names 'v' and 'type' are reserved")
        if not field.init:
            raise TypeError(f"{cls.__name__}.{field.name}: every field must be an __init__ field")
        exact, check = _validator(hints[field.name])
        if field.default is not dataclasses.MISSING:
            default: Any = (lambda value: lambda: value)(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory
        else:
            default = _REQUIRED
        compiled.append((field.name, exact, check, default))
    return _Spec(cls, cls.__name__, tuple(compiled), frozenset(f[0] for f in compiled))


def _build(spec: _Spec, raw: dict[Any, Any]) -> Message:
    # `raw` is a fresh dict from the unpacker, so it is validated and converted in place and then becomes the
    # instance's __dict__: no copy and no __init__ call on the per-token path.
    for name, exact, check, default in spec.fields:
        value = raw.get(name, _MISSING)
        if type(value) in exact:
            continue
        if value is _MISSING:
            if default is _REQUIRED:
                raise _Mismatch("missing required field", [f".{name}"])
            raw[name] = default()
            continue
        try:
            raw[name] = check(value)
        except _Mismatch as mismatch:
            mismatch.path.append(f".{name}")
            raise
    if len(raw) != len(spec.fields):
        unknown = next(key for key in raw if key not in spec.names)
        raise _Mismatch(
            "unknown field", [f".{unknown[:80]}" if type(unknown) is str else f"[{_show(unknown)}]"]
        )
    instance = object.__new__(spec.cls)
    object.__setattr__(instance, "__dict__", raw)
    return instance


# ---- encode / decode ------------------------------------------------------------------------------------


def _pack_nested(obj: Any) -> Any:
    if isinstance(obj, Message):
        return obj.__dict__
    raise TypeError(f"cannot serialize {type(obj).__name__}")


# A Packer reuses its buffer (about twice as fast as msgpack.packb) but is not thread-safe, and instances
# encode from both the engine thread and the event loop.
_packers = threading.local()


def _packer() -> msgpack.Packer:
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, default=_pack_nested)
    return packer


def encode(msg: Message) -> bytes:
    """The msgpack bytes of `msg` (types are not re-checked here; the receiver's decode does that)."""
    spec = _spec(type(msg))
    payload = {"v": PROTOCOL_VERSION, "type": spec.name}
    payload.update(msg.__dict__)
    try:
        return _packer().pack(payload)
    except (TypeError, ValueError, OverflowError) as error:
        _packers.packer = None  # a failed pack can leave partial output in the buffer
        raise WireError(f"cannot encode {spec.name}: {error}", type_name=spec.name) from error


@overload
def decode(data: bytes | bytearray | memoryview, expected: type[M]) -> M: ...


@overload
def decode(
    data: bytes | bytearray | memoryview, expected: tuple[type[Message], ...] | None = None
) -> Message: ...


def decode(
    data: bytes | bytearray | memoryview,
    expected: type[Message] | tuple[type[Message], ...] | None = None,
) -> Message:
    """Parse and validate one message; `expected` restricts which types are acceptable here."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        # The unpacker's failures (truncation, extra data, bad UTF-8, non-str keys, depth) are all "not ours".
        raise WireError(f"not a valid msgpack message: {type(error).__name__}: {error}"[:300]) from None
    if type(raw) is not dict:
        raise WireError(f"expected a msgpack map, got {_got(raw)}")
    version = raw.pop("v", _MISSING)
    if version is _MISSING:
        raise WireError("missing protocol version field 'v'")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
        raise WireError(f"unsupported protocol version {_show(version)} (supported: {supported})")
    name = raw.pop("type", _MISSING)
    if name is _MISSING:
        raise WireError("missing message type field 'type'")
    cls = Message._registry.get(name) if type(name) is str else None
    if cls is None:
        raise WireError(f"unknown message type {_show(name)}")
    if expected is not None and not issubclass(cls, expected):
        wanted = expected if isinstance(expected, tuple) else (expected,)
        names = " or ".join(t.__name__ for t in wanted)
        raise WireError(f"expected {names}, got {name}", type_name=name)
    spec = _spec(cls)
    try:
        return _build(spec, raw)
    except _Mismatch as mismatch:
        path = "".join(reversed(mismatch.path))
        raise WireError(
            f"{name}{path}: {mismatch.problem}", field=path.removeprefix(".") or None, type_name=name
        ) from None
