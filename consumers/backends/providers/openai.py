"""OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, LocalAI, TGI, llama.cpp server): chat and
completions, streamed or not, and embeddings, with the upstream's own usage billed."""

from __future__ import annotations

import array
import asyncio
import logging
import sys
from typing import Annotated, AsyncIterator

import msgspec
from msgspec import Meta

from bus.errors import UpstreamFailed
from bus.protocol import ChatBody, CompletionBody, EmbeddingsBody
from bus.settings import ModelSpec
from consumers.backends.base import ChatResult, Embedded
from consumers.backends.providers.http import Forwarding, Upstream, decoder

log = logging.getLogger(__name__)

Count = Annotated[int, Meta(ge=0, le=2**40)]


class _PromptDetails(msgspec.Struct):
    cached_tokens: Count = 0


class _Usage(msgspec.Struct):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    prompt_tokens_details: _PromptDetails | None = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    finish_reason: str | None = None
    message: _Message | None = None  # chat, whole
    delta: _Message | None = None  # chat, streamed
    text: str | None = None  # completions


class _Error(msgspec.Struct):
    message: str = ""


class _Answer(msgspec.Struct):
    """A completion, a streamed chunk of one, or an error sent in place of a chunk."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


class _Vector(msgspec.Struct):
    index: Annotated[int, Meta(ge=0, le=4096)]
    embedding: list[float]


class _EmbeddingsUsage(msgspec.Struct):
    prompt_tokens: Count = 0


class _Embeddings(msgspec.Struct):
    data: list[_Vector]
    usage: _EmbeddingsUsage | None = None


_answer = decoder(_Answer)
_embeddings = decoder(_Embeddings)
_FINISH = {"length": "length", "content_filter": "content_filter"}  # anything else ended the text: stop


class OpenAICompatible(Forwarding):
    """A chat model (chat and completions) or an embeddings model behind an OpenAI-compatible API."""

    def __init__(self, spec: ModelSpec, upstream: Upstream):
        self.kinds = frozenset({"embeddings"} if spec.kind == "embeddings" else {"chat", "completions"})
        self._model, self._dimensions = spec.upstream_model, spec.dimensions
        super().__init__(upstream)

    def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        payload = {"model": self._model, "messages": [{"role": m.role, "content": m.content} for m in body.messages]}
        return self._generate("/chat/completions", _sampling(payload, body), body.stream, cancel)

    def complete(self, body: CompletionBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        payload = {"model": self._model, "prompt": body.prompt, **({"echo": True} if body.echo else {})}
        return self._generate("/completions", _sampling(payload, body), body.stream, cancel)

    async def _generate(self, path: str, payload: dict, stream: bool, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        if not stream:
            answer = await self._up.post_json(path, payload, _answer, cancel)
            if answer is None:
                yield ChatResult("cancelled", 0, 0)
                return
            choice = _first(answer)
            text = _text(choice)
            if text:
                yield text
            yield _result(choice.finish_reason, answer.usage, payload, [text])
            return
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        finish, usage, pieces = None, None, []
        async with self._up.events(path, payload, cancel) as events:
            if events is None:
                yield ChatResult("cancelled", 0, 0)
                return
            async for _event, data in events:
                if data == b"[DONE]":
                    break
                chunk = _answer(data)
                if chunk.error is not None:  # an error sent mid-stream, as OpenAI does
                    raise UpstreamFailed(f"The upstream provider failed mid-stream: {self._up.scrub(chunk.error.message)[:500]}")
                usage = chunk.usage or usage
                for choice in chunk.choices[:1]:
                    finish = choice.finish_reason or finish
                    text = _text(choice)
                    if text:
                        pieces.append(text)
                        yield text
        if cancel.is_set():
            yield ChatResult("cancelled", *_counts(usage, payload, pieces)[:2])
            return
        if finish is None:
            raise UpstreamFailed("The upstream provider's stream ended before the completion did.")
        yield _result(finish, usage, payload, pieces)

    async def embed(self, body: EmbeddingsBody, cancel: asyncio.Event) -> Embedded | None:
        payload: dict = {"model": self._model, "input": body.inputs, "encoding_format": "float"}
        if body.dimensions is not None:
            payload["dimensions"] = body.dimensions
        answer = await self._up.post_json("/embeddings", payload, _embeddings, cancel)
        if answer is None:
            return None
        vectors = sorted(answer.data, key=lambda v: v.index)
        if [v.index for v in vectors] != list(range(len(body.inputs))):
            raise UpstreamFailed("The upstream provider did not send one vector per input.")
        size = body.dimensions or self._dimensions
        if any(len(v.embedding) != size for v in vectors):
            raise UpstreamFailed(f"The upstream provider sent vectors that are not {size}-dimensional.")
        tokens = answer.usage.prompt_tokens if answer.usage else sum(len(str(i)) for i in body.inputs) // 4
        return Embedded([_float32(v.embedding) for v in vectors], tokens)


def _sampling(payload: dict, body: ChatBody | CompletionBody) -> dict:
    """``payload`` with the body's caps and sampling settings, the ones it sets."""
    extra = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
             "stop": body.stop or None, "seed": body.seed}
    return {**payload, **{k: v for k, v in extra.items() if v is not None}}


def _first(answer: _Answer) -> _Choice:
    if not answer.choices:
        raise UpstreamFailed("The upstream provider answered with no choices.")
    return answer.choices[0]


def _text(choice: _Choice) -> str:
    message = choice.message or choice.delta
    return (message.content if message else choice.text) or ""


def _counts(usage: _Usage | None, payload: dict, pieces: list[str]) -> tuple[int, int, int]:
    """Prompt, completion and cached prompt tokens as the upstream counted them.

    An upstream that reports no usage (some servers ignore ``include_usage``) is counted here:
    ~4 characters a prompt token, a streamed piece a token (servers stream one token a chunk).
    """
    if usage is None:
        log.warning("upstream sent no usage for a %s request; billing an estimate", payload["model"])
        prompt = payload.get("prompt") or "".join(m["content"] for m in payload.get("messages", []))
        return len(prompt) // 4 + 1, len(pieces) if len(pieces) > 1 else len("".join(pieces)) // 4, 0
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return usage.prompt_tokens, usage.completion_tokens, min(cached, usage.prompt_tokens)


def _result(finish: str | None, usage: _Usage | None, payload: dict, pieces: list[str]) -> ChatResult:
    prompt, completion, cached = _counts(usage, payload, pieces)
    return ChatResult(_FINISH.get(finish or "stop", "stop"), prompt, completion, cached_prompt_tokens=cached)


def _float32(values: list[float]) -> bytes:
    """Little-endian float32 bytes, the bus's form of a vector."""
    vector = array.array("f", values)
    if sys.byteorder != "little":
        vector.byteswap()
    return vector.tobytes()
