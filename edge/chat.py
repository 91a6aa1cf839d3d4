"""POST /v1/chat/completions: validate, admit, publish, then answer whole or as SSE."""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from bus.errors import InvalidRequest, ModelNotFound, TollgateError
from bus.protocol import ChatBody, ChatMessage
from bus.settings import ModelSpec
from edge.errors import decode_body, error_event
from edge.gateway import Gateway
from edge.openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionChunkWithUsage,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    Message,
    TextPart,
)
from edge.service_tier import lane_for, tier_of

_encode = msgspec.json.Encoder().encode
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _text(message: Message, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if not isinstance(part, TextPart):
            raise InvalidRequest("This model accepts text content only.", param=f"messages[{index}].content")
        parts.append(part.text)
    return "".join(parts)


def to_body(req: ChatCompletionRequest, spec: ModelSpec) -> ChatBody:
    """The bus form of a validated OpenAI chat request, with the model's sampling defaults filled in."""
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequest("Set max_tokens or max_completion_tokens, not both.", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.", param="stream_options")
    return ChatBody(
        messages=[ChatMessage(m.role, _text(m, i)) for i, m in enumerate(req.messages)],
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=spec.temperature if req.temperature is None else req.temperature,
        top_p=spec.top_p if req.top_p is None else req.top_p,
        stop=stop,
        seed=req.seed,
        stream=req.stream,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app["gateway"]
    principal = request.app["auth"].authenticate(request)
    req = decode_body(await request.read(), ChatCompletionRequest)
    spec = gateway.settings.model(req.model)
    if spec is None:
        raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have access to it.", param="model")
    body = to_body(req, spec)
    lane = lane_for(req.service_tier, gateway.settings.edge)
    async with gateway.submit(
        tenant=principal.tenant, principal=principal.key_id, model=req.model, lane=lane, kind="chat", body=body
    ) as call:
        completion_id = "chatcmpl-" + call.envelope.id
        created = int(call.envelope.created)
        tier = tier_of(lane)
        if not req.stream:
            text: list[str] = []
            async for frame in call.frames():
                text.append(frame.text)
            usage = CompletionUsage(frame.usage.prompt_tokens, frame.usage.completion_tokens,
                                    frame.usage.prompt_tokens + frame.usage.completion_tokens)
            completion = ChatCompletion(
                completion_id, created, req.model,
                [Choice(AssistantMessage("".join(text)), frame.finish_reason)], usage, tier,
            )
            return web.Response(body=_encode(completion), content_type="application/json")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_type = ChatCompletionChunkWithUsage if include_usage else ChatCompletionChunk

        def event(choices: list[ChunkChoice], **extra) -> bytes:
            return b"data: " + _encode(chunk_type(completion_id, created, req.model, choices, tier, **extra)) + b"\n\n"

        response: web.StreamResponse | None = None
        try:
            async for frame in call.frames():
                if response is None:
                    # Headers go out with the first output, so an early failure keeps its real status.
                    response = web.StreamResponse(headers=SSE_HEADERS)
                    await response.prepare(request)
                    await response.write(event([ChunkChoice(ChunkDelta(role="assistant", content=""))]))
                if frame.text:
                    await response.write(event([ChunkChoice(ChunkDelta(content=frame.text))]))
            await response.write(event([ChunkChoice(ChunkDelta(), frame.finish_reason)]))
            if include_usage:
                u = frame.usage
                usage = CompletionUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens)
                await response.write(event([], usage=usage))
            await response.write(b"data: [DONE]\n\n")
        except TollgateError as exc:
            if response is None:
                raise
            await response.write(error_event(exc))
        await response.write_eof()
        return response
