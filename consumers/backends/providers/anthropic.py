"""Anthropic's Messages API upstream: our chat bodies as Messages requests, and its answers and
streamed events (``message_start`` … ``content_block_delta`` … ``message_delta`` … ``message_stop``)
back as text and usage."""

from __future__ import annotations

import asyncio
from typing import Annotated, AsyncIterator

import msgspec
from msgspec import Meta

from bus.errors import InvalidRequest, UpstreamFailed
from bus.protocol import ChatBody, ChatMessage, CompletionBody
from bus.settings import ModelSpec
from consumers.backends.base import ChatResult
from consumers.backends.providers.http import Forwarding, Upstream, decoder

API_VERSION = "2023-06-01"
# Anthropic's temperature runs from 0 to 1; OpenAI's to 2. Above 1 is sent as 1.
_MAX_TEMPERATURE = 1.0
_FINISH = {"max_tokens": "length", "refusal": "content_filter"}  # end_turn, stop_sequence, …: stop

Count = Annotated[int, Meta(ge=0, le=2**40)]


class _Usage(msgspec.Struct):
    input_tokens: Count = 0  # prompt tokens not read from (nor written to) the prompt cache
    output_tokens: Count = 0
    cache_read_input_tokens: Count | None = None
    cache_creation_input_tokens: Count | None = None


class _Block(msgspec.Struct):
    type: str
    text: str = ""


class _Message(msgspec.Struct):
    content: list[_Block] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _Error(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Event(msgspec.Struct):
    """One streamed event; which fields it has depends on its ``type``."""

    type: str
    message: _Message | None = None  # message_start
    delta: _Delta | None = None  # content_block_delta, message_delta
    usage: _Usage | None = None  # message_delta
    error: _Error | None = None  # error


_message = decoder(_Message)
_event = decoder(_Event)


def auth_headers(key: str) -> dict[str, str]:
    """The headers Anthropic authenticates and versions a request by."""
    return {"x-api-key": key, "anthropic-version": API_VERSION}


class AnthropicMessages(Forwarding):
    """A chat model behind Anthropic's Messages API."""

    kinds = frozenset({"chat", "completions"})

    def __init__(self, spec: ModelSpec, upstream: Upstream):
        self._model, self._max_tokens = spec.upstream_model, spec.default_max_tokens
        super().__init__(upstream)

    async def complete(self, body: CompletionBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        raise InvalidRequest("This model is served through Anthropic's Messages API, which continues chats, "
                             "not raw prompts: use /v1/chat/completions.", param="model", code="model_not_supported")
        yield  # an async generator, like every backend's complete()

    async def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        payload = self._request(body)
        if not body.stream:
            answer = await self._up.post_json("/messages", payload, _message, cancel)
            if answer is None:
                yield ChatResult("cancelled", 0, 0)
                return
            text = "".join(block.text for block in answer.content if block.type == "text")
            if text:
                yield text
            yield _result(answer.stop_reason, answer.stop_sequence, answer.usage)
            return
        start, finish, stop, usage = None, None, None, None
        async with self._up.events("/messages", {**payload, "stream": True}, cancel) as events:
            if events is None:
                yield ChatResult("cancelled", 0, 0)
                return
            async for _name, data in events:
                event = _event(data)
                if event.type == "message_start" and event.message:
                    start = event.message.usage
                elif event.type == "content_block_delta" and event.delta and event.delta.type == "text_delta":
                    if event.delta.text:
                        yield event.delta.text
                elif event.type == "message_delta" and event.delta:
                    finish, stop = event.delta.stop_reason, event.delta.stop_sequence
                    usage = event.usage
                elif event.type == "error":
                    raise UpstreamFailed(f"The upstream provider failed mid-stream: "
                                         f"{self._up.scrub(event.error.message if event.error else '')[:500]}")
                elif event.type == "message_stop":
                    break
        made = (usage.output_tokens if usage else 0) or (start.output_tokens if start else 0)
        whole = _Usage(start.input_tokens, made, start.cache_read_input_tokens,
                       start.cache_creation_input_tokens) if start else None
        if cancel.is_set():
            yield ChatResult("cancelled", *_counts(whole)[:2])
            return
        if finish is None:
            raise UpstreamFailed("The upstream provider's stream ended before the message did.")
        yield _result(finish, stop, whole)

    def _request(self, body: ChatBody) -> dict:
        """The Messages request for ``body``: system messages lifted into ``system``, the rest in turn."""
        system = "\n\n".join(m.content for m in body.messages if m.role in ("system", "developer"))
        turns = [_turn(m, i) for i, m in enumerate(body.messages) if m.role not in ("system", "developer")]
        if not turns:
            raise InvalidRequest("This model needs at least one user message.", param="messages")
        payload: dict = {"model": self._model, "max_tokens": body.max_tokens or self._max_tokens, "messages": turns}
        if system:
            payload["system"] = system
        if body.temperature is not None:
            payload["temperature"] = min(body.temperature, _MAX_TEMPERATURE)
        if body.top_p is not None:
            payload["top_p"] = body.top_p
        if body.stop:
            payload["stop_sequences"] = body.stop
        return payload


def _turn(message: ChatMessage, index: int) -> dict:
    if message.role not in ("user", "assistant"):
        raise InvalidRequest(f"This model takes system, user and assistant messages, not {message.role}.",
                             param=f"messages[{index}].role")
    return {"role": message.role, "content": message.content}


def _counts(usage: _Usage | None) -> tuple[int, int, int]:
    """Prompt tokens (cache reads and writes included, as OpenAI counts them), completion tokens,
    and the prompt tokens read from the cache."""
    if usage is None:
        raise UpstreamFailed("The upstream provider sent no usage.")
    cached = usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + cached + (usage.cache_creation_input_tokens or 0)
    return prompt, usage.output_tokens, cached


def _result(finish: str | None, stop: str | None, usage: _Usage | None) -> ChatResult:
    prompt, completion, cached = _counts(usage)
    return ChatResult(_FINISH.get(finish or "", "stop"), prompt, completion, stop=stop, cached_prompt_tokens=cached)
