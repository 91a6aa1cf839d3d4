"""POST /v1/chat/completions on the bus: the OpenAI wire types, request -> body, frames -> results.

Shared by the edge and the SDK so both give back the very same typed results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Sequence, Union

import msgspec
from msgspec import Meta

from bus.account.prices import Charge, Units
from bus.errors import InvalidRequest
from bus.protocol import ChatBody, ChatMessage, Envelope, Final
from bus.openai.unsupported import UnsupportedChatOptions, refuse_unsupported
from bus.settings import ModelSpec


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageUrl(msgspec.Struct, forbid_unknown_fields=True):
    url: str  # a data URL (base64 PNG, JPEG, WebP or GIF) or an http(s) URL from a host the operator allows
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model reads the image as it reads any


class ImageUrlPart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageUrl


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImageUrlPart]], None] = None
    name: str | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool = True  # padding against length side channels: nothing here to pad for


class ChatCompletionRequest(UnsupportedChatOptions, forbid_unknown_fields=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: Union[str, Annotated[list[str], Meta(max_length=4)], None] = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    user: str | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None


# -- responses ----------------------------------------------------------------


class CompletionUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"
    refusal: None = None


class Choice(msgspec.Struct):
    message: AssistantMessage
    finish_reason: str
    index: int = 0
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    service_tier: str
    object: str = "chat.completion"
    system_fingerprint: None = None


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    delta: ChunkDelta
    finish_reason: str | None = None
    index: int = 0
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    service_tier: str
    object: str = "chat.completion.chunk"
    system_fingerprint: None = None


class ChatCompletionChunkWithUsage(ChatCompletionChunk):
    """A chunk when ``stream_options.include_usage`` is set: ``usage`` is null until the last."""

    usage: CompletionUsage | None = None


def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    """The bus form of OpenAI messages: text only (a 400 naming the part otherwise)."""
    return [ChatMessage(m.role, _text(m, i)) for i, m in enumerate(messages)]


def _text(message: Message, index: int, images: bool = False) -> str:
    """The text of a message's content; image parts are skipped if ``images``, a 400 naming the part otherwise."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if isinstance(part, TextPart):
            parts.append(part.text)
        elif not images:
            raise InvalidRequest("This model accepts text content only.", param=f"messages[{index}].content")
    return "".join(parts)


@dataclass(frozen=True)
class ImageRef:
    """One ``image_url`` part of a request: its URL, and the parameter a 400 about it names."""

    url: str
    param: str


def image_refs(req: ChatCompletionRequest, spec: ModelSpec | None) -> list[ImageRef]:
    """The request's ``image_url`` parts in order; a 400 naming the first if the model does not read images."""
    refs = [ImageRef(part.image_url.url, f"messages[{i}].content[{j}].image_url.url")
            for i, m in enumerate(req.messages) if isinstance(m.content, list)
            for j, part in enumerate(m.content) if isinstance(part, ImageUrlPart)]
    if refs and not (spec is not None and spec.vision):
        raise InvalidRequest(f"The model '{req.model}' does not read images; send text content only.",
                             param=refs[0].param.removesuffix(".image_url.url"), code="model_not_supported")
    return refs


def _messages(messages: list[Message], images: Sequence[bytes]) -> list[ChatMessage]:
    """The bus form of OpenAI messages whose ``image_url`` parts read as ``images``, in order."""
    out, left = [], iter(images)
    for i, m in enumerate(messages):
        count = sum(isinstance(p, ImageUrlPart) for p in m.content) if isinstance(m.content, list) else 0
        out.append(ChatMessage(m.role, _text(m, i, images=True), images=[next(left) for _ in range(count)]))
    return out


def to_body(req: ChatCompletionRequest, spec: ModelSpec | None, images: Sequence[bytes] = ()) -> ChatBody:
    """The bus form of a validated OpenAI chat request, with the model's sampling defaults filled in.

    ``images`` are the bytes of its ``image_refs``, in order, as the edge fetched and checked them.
    """
    if len(image_refs(req, spec)) != len(images):  # a publisher that reads no images (the SDK) sends none
        raise InvalidRequest("image_url parts are read by the HTTP edge only.", param="messages")
    if spec is not None and spec.kind != "chat":  # its workers would refuse it unrun
        raise InvalidRequest(f"The model '{req.model}' does not chat; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    refuse_unsupported(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequest("Set max_tokens or max_completion_tokens, not both.", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if spec is not None and max_tokens is not None and max_tokens > spec.context_tokens:
        # Refused before admission: a cap the model can never reach would only reserve quota.
        raise InvalidRequest(f"max_tokens is {max_tokens}, more than this model's context of "
                             f"{spec.context_tokens} tokens.", param="max_tokens", code="context_length_exceeded")
    return ChatBody(
        messages=_messages(req.messages, images),
        max_tokens=max_tokens,
        temperature=spec.temperature if req.temperature is None and spec else req.temperature,
        top_p=spec.top_p if req.top_p is None and spec else req.top_p,
        stop=stop,
        seed=req.seed,
        stream=req.stream,
    )


# Completion tokens assumed for per-minute limits when a request sets no max_tokens; corrected later.
DEFAULT_COMPLETION_ESTIMATE = 256
# Tokens a chat template may add around the messages (role markers, a default system prompt).
_TEMPLATE_TOKENS, _MESSAGE_TOKENS = 64, 8


def prepaid_body(body: ChatBody, spec: ModelSpec) -> ChatBody:
    """A prepaid request's body: capped at the model's ``default_max_tokens`` if it set none (a hold needs a bound)."""
    return body if body.max_tokens is not None else msgspec.structs.replace(body, max_tokens=spec.default_max_tokens)


def charge(body: ChatBody) -> Charge:
    """The token estimate (~4 characters a token, plus the completion cap) and the most ``body`` can use:
    every prompt byte a token (byte-level tokenizers spend at least a byte a token) and its whole cap."""
    estimate = sum(len(m.content) for m in body.messages) // 4 + 4 * len(body.messages)
    prompt_bound = sum(len(m.content.encode()) + _MESSAGE_TOKENS for m in body.messages) + _TEMPLATE_TOKENS
    images = sum(len(m.images) for m in body.messages)  # priced per image, not as tokens
    return Charge(tokens=estimate + (body.max_tokens or DEFAULT_COMPLETION_ESTIMATE),
                  max_units=Units(input_tokens=prompt_bound, output_tokens=body.max_tokens or 0, input_images=images))


def usage_of(final: Final) -> CompletionUsage:
    u = final.usage
    return CompletionUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens)


class ChatResults:
    """Builds the OpenAI objects for one request: a whole completion, or its stream of chunks."""

    def __init__(self, envelope: Envelope, model: str, tier: str, include_usage: bool = False):
        self.id = "chatcmpl-" + envelope.id
        self.created = int(envelope.created)
        self.model, self.tier = model, tier
        self._chunk = ChatCompletionChunkWithUsage if include_usage else ChatCompletionChunk

    def completion(self, text: str, final: Final) -> ChatCompletion:
        choice = Choice(AssistantMessage(text), final.finish_reason)
        return ChatCompletion(self.id, self.created, self.model, [choice], usage_of(final), self.tier)

    def chunk(self, choices: list[ChunkChoice], **extra) -> ChatCompletionChunk:
        return self._chunk(self.id, self.created, self.model, choices, self.tier, **extra)

    def opening(self) -> list[ChatCompletionChunk]:
        """The chunks that open a stream, before any text: the assistant's role."""
        return [self.chunk([ChunkChoice(ChunkDelta(role="assistant", content=""))])]

    def delta(self, text: str) -> ChatCompletionChunk:
        return self.chunk([ChunkChoice(ChunkDelta(content=text))])

    def closing(self, final: Final) -> list[ChatCompletionChunk]:
        """The finish chunk, then the usage chunk when ``include_usage`` was asked for."""
        chunks = [self.chunk([ChunkChoice(ChunkDelta(), final.finish_reason)])]
        if self._chunk is ChatCompletionChunkWithUsage:
            chunks.append(self.chunk([], usage=usage_of(final)))
        return chunks
