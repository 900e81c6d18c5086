"""Prompt token ids for a parsed request (tokenizer, chat template) and the context-window check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError

from services.router.errors import bad_request
from services.router.parsing import ParsedRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def completion_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, parsed: ParsedRequest, vocab_size: int
) -> list[list[int]]:
    """One token-id list per prompt: given ids are checked against the vocabulary, text is tokenized."""
    result = []
    for index, prompt in enumerate(parsed.prompts):
        param = "prompt" if len(parsed.prompts) == 1 else f"prompt[{index}]"
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt, add_special_tokens=parsed.add_special_tokens)["input_ids"])
            if not ids:
                raise bad_request(f"'{param}' tokenizes to no tokens", param)
        else:
            ids = list(prompt)
            check_token_ids(ids, vocab_size, param)
        result.append(ids)
    return result


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, parsed: ParsedRequest) -> list[int]:
    """The chat template rendered to text, then tokenized once (the template already wrote any BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    kwargs = dict(parsed.chat_template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            [dict(message) for message in parsed.messages],
            tokenize=False,
            add_generation_prompt=parsed.add_generation_prompt,
            continue_final_message=parsed.continue_final_message,
            **kwargs,
        )
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        # Templates reject some conversations themselves (e.g. "roles must alternate user/assistant").
        raise bad_request(f"the chat template rejected the messages: {error}"[:500], "messages") from None
    if not isinstance(text, str):
        raise bad_request("the chat template did not render to text", "messages")
    ids = list(tokenizer(text, add_special_tokens=parsed.add_special_tokens)["input_ids"])
    if not ids:
        raise bad_request("the messages render to an empty prompt", "messages")
    return ids


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"'{param}' holds token id {bad}, outside the vocabulary (size {vocab_size})", param
        )


def fit_max_tokens(parsed: ParsedRequest, prompt_len: int, max_model_len: int | None) -> int:
    """The request's max_tokens, or the rest of the context when it gave none; 400 if it cannot fit."""
    prompt_param = "messages" if parsed.kind == "chat" else "prompt"
    token_param = parsed.param_names.get("max_tokens", "max_tokens")
    if max_model_len is None:
        if parsed.max_tokens is None:
            raise bad_request(
                f"'{token_param}' is required: the model's context length is unknown", token_param
            )
        return parsed.max_tokens
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens and at least one token must be generated; shorten the {prompt_param}",
            prompt_param,
        )
    if parsed.max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + parsed.max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + parsed.max_tokens} tokens ({prompt_len} in the {prompt_param}, "
            f"{parsed.max_tokens} in the completion); reduce the {prompt_param} or '{token_param}'",
            token_param,
        )
    return parsed.max_tokens
