"""POST /v1/tokenize and /v1/detokenize: the wire types (vLLM's shape) and their bus asks.

Not OpenAI endpoints; vLLM's field names are used so existing clients work: tokenize takes a
``prompt`` (read as completions reads it) or chat ``messages`` (through the chat template, as
chat reads them) and answers ``tokens``, ``count`` and ``max_model_len``; detokenize takes
``tokens`` and answers ``prompt``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from bus.errors import InvalidRequest
from bus.openai.chat import Message, chat_messages
from bus.protocol import DetokenizeAsk, TokenId, TokenizeAsk
from bus.settings import ModelSpec


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    prompt: str | None = None
    messages: Annotated[list[Message], Meta(min_length=1)] | None = None


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    tokens: list[TokenId]


class DetokenizeResponse(msgspec.Struct):
    prompt: str


def check_model(name: str, spec: ModelSpec) -> None:
    """Only text-generating models tokenize here: their workers answer the asks."""
    if spec.kind != "chat":
        raise InvalidRequest(f"The model '{name}' does not tokenize here; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    if spec.vision:  # vision models serve chat alone
        raise InvalidRequest(f"The model '{name}' reads images and does not tokenize here.",
                             param="model", code="model_not_supported")


def tokenize_ask(req: TokenizeRequest) -> TokenizeAsk:
    """The worker's ask for ``req``: exactly one of ``prompt`` and ``messages``."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("Send either prompt or messages.", param="prompt" if req.prompt is None else "messages")
    if req.messages is None:
        return TokenizeAsk(prompt=req.prompt)
    return TokenizeAsk(messages=chat_messages(req.messages))


def detokenize_ask(req: DetokenizeRequest) -> DetokenizeAsk:
    """The worker's ask for ``req``."""
    return DetokenizeAsk(tokens=req.tokens)
