"""POST /v1/messages and /v1/messages/count_tokens on the bus: Anthropic's wire types, request -> chat
body, frames -> message and stream events.

A Messages request runs as the ``chat`` kind, so every chat model serves it and limits,
credits and metering apply unchanged. Text only: other content blocks (images, tools) are
400s naming the block. Text blocks of one message (or of ``system``) are joined by newlines.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from bus.errors import InvalidRequest
from bus.protocol import ChatBody, ChatMessage, Envelope, Final
from bus.settings import ModelSpec

# Stop sequences a request may set; each is held back from a stream until it cannot begin one.
MAX_STOP_SEQUENCES = 16


class TextBlock(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str
    cache_control: dict | None = None  # Anthropic's prompt-caching hint: accepted, it changes no answer


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: Union[str, list[TextBlock]]


class Metadata(msgspec.Struct, forbid_unknown_fields=True):
    user_id: Annotated[str, Meta(max_length=256)] | None = None  # the caller's own end-user id, as OpenAI's ``user``


class MessagesRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)]  # required, as Anthropic requires it
    messages: Annotated[list[Message], Meta(min_length=1)]
    system: Union[str, list[TextBlock], None] = None
    stop_sequences: Annotated[list[str], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None  # Anthropic's range
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None  # refused in to_body: no model here samples by it
    metadata: Metadata | None = None
    cache_control: dict | None = None  # Anthropic's automatic prompt caching: accepted, it changes no answer
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: the key's default lane


class CountTokensRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    system: Union[str, list[TextBlock], None] = None


# -- responses ----------------------------------------------------------------


class TextContent(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class Usage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class AssistantMessage(msgspec.Struct, tag="message", tag_field="type"):
    id: str
    model: str
    content: list[TextContent]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage
    role: str = "assistant"


class TokenCount(msgspec.Struct):
    input_tokens: int


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    message: AssistantMessage


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: TextContent


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    text: str


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    index: int


class StopDelta(msgspec.Struct):
    stop_reason: str
    stop_sequence: str | None


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    delta: StopDelta
    usage: Usage  # the whole request's: the prompt's count is known only once the worker is done


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type"):
    pass


StreamEvent = Union[MessageStart, ContentBlockStart, Ping, ContentBlockDelta, ContentBlockStop, MessageDelta, MessageStop]


def chat_messages(system: str | list[TextBlock] | None, messages: list[Message]) -> list[ChatMessage]:
    """The bus form of a system prompt and Anthropic messages: the system prompt first, as a system turn."""
    turns = [ChatMessage("system", _text(system))] if system else []
    return turns + [ChatMessage(m.role, _text(m.content)) for m in messages]


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(block.text for block in content)


def to_body(req: MessagesRequest, spec: ModelSpec) -> ChatBody:
    """The bus form of a validated Messages request, with the model's sampling defaults filled in."""
    if spec.kind != "chat":  # its workers would refuse it unrun
        raise InvalidRequest(f"The model '{req.model}' does not chat; it serves {spec.kind}.", param="model")
    if req.top_k is not None:
        raise InvalidRequest("top_k is not supported by this gateway: use temperature or top_p.", param="top_k")
    if req.messages[-1].role == "assistant":
        # Anthropic continues a final assistant turn (prefill); a chat template closes it instead.
        raise InvalidRequest("The last message must be from the user: continuing an assistant turn is not "
                             "supported here.", param=f"messages[{len(req.messages) - 1}].role")
    stop = list(req.stop_sequences or [])
    if any(not s for s in stop):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop_sequences")
    if req.max_tokens > spec.context_tokens:
        # Refused before admission: a cap the model can never reach would only reserve quota.
        raise InvalidRequest(f"max_tokens is {req.max_tokens}, more than this model's context of "
                             f"{spec.context_tokens} tokens.", param="max_tokens")
    return ChatBody(
        messages=chat_messages(req.system, req.messages),
        max_tokens=req.max_tokens,
        temperature=spec.temperature if req.temperature is None else req.temperature,
        top_p=spec.top_p if req.top_p is None else req.top_p,
        stop=stop,
        stream=req.stream,
    )


def stop_reason(final: Final) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for how a generation ended."""
    if final.finish_reason == "length":
        return "max_tokens", None
    if final.stop is not None:
        return "stop_sequence", final.stop
    return "end_turn", None


class MessagesResults:
    """Builds the Anthropic objects for one request: a whole message, or its stream of events."""

    def __init__(self, envelope: Envelope, model: str):
        self.id = "msg_" + envelope.id
        self.model = model

    def completion(self, text: str, final: Final) -> AssistantMessage:
        reason, sequence = stop_reason(final)
        usage = Usage(final.usage.prompt_tokens, final.usage.completion_tokens)
        return AssistantMessage(self.id, self.model, [TextContent(text)], reason, sequence, usage)

    def opening(self) -> list[StreamEvent]:
        """The message (no content, no usage yet), its one text block, and a ping."""
        message = AssistantMessage(self.id, self.model, [], None, None, Usage(0, 0))
        return [MessageStart(message), ContentBlockStart(0, TextContent("")), Ping()]

    def delta(self, text: str) -> ContentBlockDelta:
        return ContentBlockDelta(0, TextDelta(text))

    def closing(self, final: Final) -> list[StreamEvent]:
        """The block's end, the stop reason with the whole usage, and the message's end."""
        reason, sequence = stop_reason(final)
        usage = Usage(final.usage.prompt_tokens, final.usage.completion_tokens)
        return [ContentBlockStop(0), MessageDelta(StopDelta(reason, sequence), usage), MessageStop()]
