"""Validation of /v1/completions and /v1/chat/completions bodies into one `ParsedRequest` (pure, no I/O).

Every rejection is a 400 APIError whose `param` names the field, as OpenAI does. Unknown fields are ignored:
vLLM's benchmark and other clients send extras (`ignore_eos`, `repetition_penalty`, vendor fields), and a
server that rejects them fails every request. Known fields the engine cannot honour (`logit_bias`, `tools`,
`echo`, structured output) are rejected by name rather than silently ignored. `null` means "not given",
since OpenAI clients send it for unset options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from services.instance.engine.sampling_params import MAX_TOP_LOGPROBS, ParameterError, SamplingParams
from services.router.errors import bad_request

MAX_N = 128
MAX_CHOICES = 256  # prompts × n in one HTTP request
MAX_TEMPERATURE = 2.0  # OpenAI's range
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# apply_chat_template's own arguments: chat_template_kwargs may only set template variables (e.g.
# enable_thinking), never how the template is applied (return_tensors would even import torch).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
        "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip

Kind = Literal["completion", "chat"]
Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class ParsedRequest:
    kind: Kind
    model: str | None
    prompts: tuple[Prompt, ...]  # completions: text or token ids; chat: empty (the messages make one prompt)
    messages: tuple[dict[str, Any], ...]
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: the rest of the context window
    stop: tuple[str, ...]  # applied by the router's detokenizer, not by the engine
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    logprobs: int | None  # the engine's top-N; None when not asked for
    add_special_tokens: bool
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Sampling fields under the engine's names (temperature, top_p, seed, stop_token_ids, …).
    sampling: dict[str, Any] = field(default_factory=dict)
    # Engine field → the request field it came from, so engine-side errors name what the client sent.
    param_names: dict[str, str] = field(default_factory=dict)

    @property
    def num_choices(self) -> int:
        return max(1, len(self.prompts)) * self.n


MAX_STOP_STRINGS = 64  # OpenAI takes 4; vLLM sets no limit, and agents send a handful
MAX_STOP_LENGTH = 1024  # characters

# ---- typed getters -----------------------------------------------------------------------------------------

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _get_int(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    # JSON has one number type; 16.0 is still 16, but 16.5 or true is not an integer.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {_type_name(value)}", name)
    if not INT64_MIN <= value <= INT64_MAX:  # nothing here means more, and the wire carries 64 bits
        raise bad_request(f"'{name}' is out of range: {value}"[:200], name)
    return value


def _get_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' must be a number, got {_type_name(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):  # NaN, Infinity (Python's json accepts both)
        raise bad_request(f"'{name}' must be a finite number, got {value!r}"[:200], name)
    return number


def _get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_type_name(value)}", name)
    return value


def _get_dict(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"'{name}' must be an object, got {_type_name(value)}", name)
    return value


def _at_least(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {value}", name)


# ---- shared fields -----------------------------------------------------------------------------------------


def _reject_unsupported(body: dict[str, Any]) -> None:
    """Known OpenAI/vLLM options the engine cannot honour: say so instead of quietly ignoring them."""
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported", "logit_bias")
    if body.get("echo"):
        raise bad_request("'echo' is not supported", "echo")
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported", "suffix")
    if body.get("prompt_logprobs") is not None:
        raise bad_request("'prompt_logprobs' is not supported", "prompt_logprobs")
    if body.get("tools"):
        raise bad_request("'tools' (function calling) is not supported", "tools")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1) and best_of != 1:
        raise bad_request("'best_of' other than n is not supported", "best_of")


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("'stop' must be a non-empty string or an array of non-empty strings", "stop")
    # Every generated token is matched against every stop string, on the router's event loop.
    if len(items) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}", "stop")
    longest = max(items, key=len, default="")
    if len(longest) > MAX_STOP_LENGTH:
        raise bad_request(
            f"stop strings are at most {MAX_STOP_LENGTH} characters, got {len(longest)}", "stop"
        )
    return tuple(dict.fromkeys(items))


def _stop_token_ids(body: dict[str, Any]) -> list[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    ):
        raise bad_request("'stop_token_ids' must be an array of non-negative integers", "stop_token_ids")
    return ids


def _stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get_bool(body, "stream", False)
    options = _get_dict(body, "stream_options")
    if options and not stream:  # as vLLM answers it
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    return stream, bool(include_usage)


def _sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The engine's sampling fields that share their request names (types checked; ranges below)."""
    sampling: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        value = _get_number(body, name)
        if value is not None:
            sampling[name] = value
    for name in ("top_k", "seed", "min_tokens"):
        value = _get_int(body, name)
        if value is not None:
            sampling[name] = value
    sampling["ignore_eos"] = _get_bool(body, "ignore_eos", False)
    stop_token_ids = _stop_token_ids(body)
    if stop_token_ids:
        sampling["stop_token_ids"] = stop_token_ids
    temperature = sampling.get("temperature")
    if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise bad_request(
            f"'temperature' must be in [0, {MAX_TEMPERATURE:g}], got {temperature:g}", "temperature"
        )
    return sampling


def check_sampling(parsed: ParsedRequest, max_tokens: int) -> SamplingParams:
    """The engine's SamplingParams for `max_tokens`, validated with the engine's own rules."""
    try:
        return SamplingParams(
            **parsed.sampling,
            max_tokens=max_tokens,
            logprobs=parsed.logprobs,
            skip_special_tokens=parsed.skip_special_tokens,
        ).validate()
    except ParameterError as error:
        param = parsed.param_names.get(error.field, error.field)
        raise bad_request(f"'{param}': {error.message}", param) from None


def _finish(parsed: ParsedRequest) -> ParsedRequest:
    if parsed.num_choices > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts × n)", "n")
    # Range checks now, before any tokenizing; the final max_tokens is checked again once it is known.
    check_sampling(parsed, parsed.max_tokens if parsed.max_tokens is not None else 2**31 - 1)
    return parsed


def _common(body: dict[str, Any]) -> dict[str, Any]:
    _reject_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_type_name(model)}", "model")
    n = _get_int(body, "n", 1)
    assert n is not None
    if not 1 <= n <= MAX_N:
        raise bad_request(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    stream, include_usage = _stream_fields(body)
    return {
        "model": model,
        "n": n,
        "stream": stream,
        "include_usage": include_usage,
        "stop": _stop_strings(body),
        "include_stop_str_in_output": _get_bool(body, "include_stop_str_in_output", False),
        "skip_special_tokens": _get_bool(body, "skip_special_tokens", True),
        "sampling": _sampling_fields(body),
    }


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    return body


# ---- completions -------------------------------------------------------------------------------------------


def _token_ids(value: list[Any], param: str) -> tuple[int, ...]:
    if not value:
        raise bad_request(f"'{param}' must not be empty", param)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise bad_request(f"'{param}' token ids must be non-negative integers", param)
    return tuple(value)


def _prompts(body: dict[str, Any]) -> tuple[Prompt, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        return (prompt,)
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("'prompt' must be a string, an array of strings or an array of token ids", "prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return (_token_ids(prompt, "prompt"),)
    prompts: list[Prompt] = []
    for index, item in enumerate(prompt):
        param = f"prompt[{index}]"
        if isinstance(item, str):
            if not item:
                raise bad_request(f"'{param}' must not be empty", param)
            prompts.append(item)
        elif isinstance(item, list):
            prompts.append(_token_ids(item, param))
        else:
            raise bad_request(f"'{param}' must be a string or an array of token ids", param)
    return tuple(prompts)


def parse_completion(body: Any) -> ParsedRequest:
    body = _require_object(body)
    common = _common(body)
    prompts = _prompts(body)
    max_tokens = _get_int(body, "max_tokens", 16)  # OpenAI's and vLLM's default for completions
    _at_least("max_tokens", max_tokens, 1)
    logprobs = _get_int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "logprobs")
    return _finish(
        ParsedRequest(
            kind="completion",
            prompts=prompts,
            messages=(),
            max_tokens=max_tokens,
            logprobs=logprobs,
            add_special_tokens=_get_bool(body, "add_special_tokens", True),
            **common,
        )
    )


# ---- chat --------------------------------------------------------------------------------------------------


def _message_content(content: Any, param: str, role: str) -> str:
    if content is None and role == "assistant":
        return ""  # an assistant turn that only called tools
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            part_param = f"{param}[{index}]"
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(f"'{part_param}': only text content parts are supported", part_param)
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise bad_request(f"'{param}' must be a string or an array of text parts", param)


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    result = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{param}' must be an object", param)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"'{param}.role' must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}"[:300],
                f"{param}.role",
            )
        normalized = {
            "role": role,
            "content": _message_content(message.get("content"), f"{param}.content", role),
        }
        name = message.get("name")
        if isinstance(name, str):
            normalized["name"] = name
        result.append(normalized)
    return tuple(result)


def _template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = _get_dict(body, "chat_template_kwargs")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        param = f"chat_template_kwargs.{reserved[0]}"
        raise bad_request(f"'{param}' cannot be set: it is not a template variable", param)
    return kwargs


def parse_chat(body: Any) -> ParsedRequest:
    body = _require_object(body)
    common = _common(body)
    messages = _messages(body)
    param_names: dict[str, str] = {}
    max_tokens = _get_int(body, "max_completion_tokens")
    if max_tokens is not None:
        _at_least("max_completion_tokens", max_tokens, 1)
        param_names["max_tokens"] = "max_completion_tokens"
    else:
        max_tokens = _get_int(body, "max_tokens")  # deprecated by OpenAI, still what most clients send
        _at_least("max_tokens", max_tokens, 1)
    want_logprobs = _get_bool(body, "logprobs", False)
    top_logprobs = _get_int(body, "top_logprobs")
    if top_logprobs is not None:
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}", "top_logprobs"
            )
        if top_logprobs > 0 and not want_logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    param_names["logprobs"] = "top_logprobs"
    add_generation_prompt = _get_bool(body, "add_generation_prompt", True)
    continue_final_message = _get_bool(body, "continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            "continue_final_message",
        )
    return _finish(
        ParsedRequest(
            kind="chat",
            prompts=(),
            messages=messages,
            max_tokens=max_tokens,
            logprobs=(top_logprobs or 0) if want_logprobs else None,
            add_special_tokens=_get_bool(body, "add_special_tokens", False),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=_template_kwargs(body),
            param_names=param_names,
            **common,
        )
    )
