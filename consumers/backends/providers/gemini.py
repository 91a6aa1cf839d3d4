"""Google Gemini upstream: our chat bodies as ``generateContent`` requests (``streamGenerateContent``
with ``alt=sse`` when streamed), and its candidates and ``usageMetadata`` back as text and usage."""

from __future__ import annotations

import asyncio
from typing import Annotated, AsyncIterator
from urllib.parse import quote

import msgspec
from msgspec import Meta

from bus.errors import InvalidRequest, UpstreamFailed
from bus.protocol import ChatBody, CompletionBody
from bus.settings import ModelSpec
from consumers.backends.base import ChatResult
from consumers.backends.providers.http import Forwarding, Upstream, decoder

Count = Annotated[int, Meta(ge=0, le=2**40)]
# finishReason: STOP ended the text; MAX_TOKENS hit the cap; the rest (SAFETY, RECITATION, …) filtered it.
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "FINISH_REASON_UNSPECIFIED": "stop"}
_ROLES = {"user": "user", "assistant": "model"}


class _Part(msgspec.Struct):
    text: str = ""
    thought: bool = False  # a thinking model's thoughts are not the answer


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: Count = 0
    candidates_token_count: Count = 0
    cached_content_token_count: Count = 0
    thoughts_token_count: Count = 0  # billed as output, as Google does


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None


_response = decoder(_Response)


def auth_headers(key: str) -> dict[str, str]:
    """The header Gemini's API authenticates a request by."""
    return {"x-goog-api-key": key}


class GeminiChat(Forwarding):
    """A chat model behind Google's Gemini API."""

    kinds = frozenset({"chat", "completions"})

    def __init__(self, spec: ModelSpec, upstream: Upstream):
        self._path = f"/models/{quote(spec.upstream_model, safe='')}"
        super().__init__(upstream)

    async def complete(self, body: CompletionBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        raise InvalidRequest("This model is served through Gemini's generateContent, which continues chats, "
                             "not raw prompts: use /v1/chat/completions.", param="model", code="model_not_supported")
        yield  # an async generator, like every backend's complete()

    async def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        payload = _request(body)
        if not body.stream:
            answer = await self._up.post_json(self._path + ":generateContent", payload, _response, cancel)
            if answer is None:
                yield ChatResult("cancelled", 0, 0)
                return
            finish, text = _read(answer)
            if text:
                yield text
            yield _result(finish, answer.usage_metadata)
            return
        finish, usage = None, None
        async with self._up.events(self._path + ":streamGenerateContent?alt=sse", payload, cancel) as events:
            if events is None:
                yield ChatResult("cancelled", 0, 0)
                return
            async for _name, data in events:
                chunk = _response(data)
                usage = chunk.usage_metadata or usage
                reason, text = _read(chunk)
                finish = reason or finish
                if text:
                    yield text
        if cancel.is_set():
            yield ChatResult("cancelled", *_counts(usage)[:2] if usage else (0, 0))
            return
        if finish is None:  # Gemini's stream has no end marker: the last chunk carries the finish reason
            raise UpstreamFailed("The upstream provider's stream ended before the answer did.")
        yield _result(finish, usage)


def _request(body: ChatBody) -> dict:
    """The generateContent request for ``body``: system messages as ``systemInstruction``, turns as contents."""
    system = [{"text": m.content} for m in body.messages if m.role in ("system", "developer")]
    contents = []
    for i, m in enumerate(body.messages):
        if m.role in ("system", "developer"):
            continue
        if m.role not in _ROLES:
            raise InvalidRequest(f"This model takes system, user and assistant messages, not {m.role}.",
                                 param=f"messages[{i}].role")
        contents.append({"role": _ROLES[m.role], "parts": [{"text": m.content}]})
    if not contents:
        raise InvalidRequest("This model needs at least one user message.", param="messages")
    config = {"maxOutputTokens": body.max_tokens, "temperature": body.temperature, "topP": body.top_p,
              "stopSequences": body.stop or None, "seed": body.seed}
    payload: dict = {"contents": contents}
    if system:
        payload["systemInstruction"] = {"parts": system}
    config = {k: v for k, v in config.items() if v is not None}
    if config:
        payload["generationConfig"] = config
    return payload


def _read(answer: _Response) -> tuple[str | None, str]:
    """The first candidate's finish reason (None while it goes on) and its text."""
    if not answer.candidates:
        return None, ""
    candidate = answer.candidates[0]
    parts = candidate.content.parts if candidate.content else []
    return candidate.finish_reason, "".join(p.text for p in parts if not p.thought)


def _counts(usage: _UsageMetadata) -> tuple[int, int, int]:
    return (usage.prompt_token_count, usage.candidates_token_count + usage.thoughts_token_count,
            min(usage.cached_content_token_count, usage.prompt_token_count))


def _result(finish: str | None, usage: _UsageMetadata | None) -> ChatResult:
    if usage is None:
        raise UpstreamFailed("The upstream provider sent no usage.")
    prompt, completion, cached = _counts(usage)
    return ChatResult(_FINISH.get(finish or "STOP", "content_filter"), prompt, completion, cached_prompt_tokens=cached)
