"""OpenAI request options this gateway does not implement, accepted at the values that change nothing.

Clients send some of them on every call (LangChain sends its penalties at 0, some SDK helpers
``response_format={"type": "text"}``), so refusing the option itself would break them. Any other
value is refused by name, never silently ignored: the caller asked for behaviour it would not get.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Union

import msgspec
from msgspec import Meta

from bus.errors import InvalidRequest


class UnsupportedOptions(msgspec.Struct, kw_only=True):
    """The options both chat and (legacy) completions requests may carry."""

    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=300)] | None = None


class UnsupportedChatOptions(UnsupportedOptions, kw_only=True):
    """Chat's own: tool calls, log probabilities, structured output, stored completions."""

    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=128)] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None  # means nothing without tools
    response_format: dict[str, Any] | None = None
    modalities: Annotated[list[str], Meta(max_length=4)] | None = None
    store: bool | None = None
    metadata: Annotated[dict[str, Annotated[str, Meta(max_length=512)]], Meta(max_length=16)] | None = None
    prompt_cache_key: Annotated[str, Meta(max_length=1024)] | None = None  # a hint to a provider's cache
    safety_identifier: Annotated[str, Meta(max_length=1024)] | None = None  # a hint to a provider's moderation


class UnsupportedCompletionOptions(UnsupportedOptions, kw_only=True):
    """Legacy completions' own."""

    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None
    suffix: str | None = None


# Each option's values that change nothing (None, absent, always does).
_NO_OP: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v == 0,
    "presence_penalty": lambda v: v == 0,
    "logit_bias": lambda v: not v,
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in ("none", "auto"),
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
    "store": lambda v: v is False,
    "best_of": lambda v: v == 1,
    "suffix": lambda v: v == "",
}


def refuse_unsupported(options: UnsupportedOptions) -> None:
    """A 400 naming the first option set to a value that would change the answer."""
    for name, no_op in _NO_OP.items():
        value = getattr(options, name, None)
        if value is not None and not no_op(value):
            raise InvalidRequest(f"'{name}' is not supported by this gateway: leave it out, or send its "
                                 "default.", param=name, code="unsupported_parameter")
