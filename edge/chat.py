"""POST /v1/chat/completions: validate, admit, publish, then answer whole or as SSE."""

from __future__ import annotations

import msgspec
from aiohttp import web

from bus.errors import InvalidRequest, ModelNotFound, TollgateError
from bus.protocol import ChatBody, ChatMessage, Final
from bus.settings import ModelSpec
from edge.errors import decode_body, error_event
from edge.gateway import Call, Gateway
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
from edge.ratelimit import DEFAULT_COMPLETION_ESTIMATE, RateLimiter
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


def estimate_tokens(body: ChatBody) -> int:
    """Tokens to charge at admission: ~4 characters a token in, plus the completion cap."""
    prompt = sum(len(m.content) for m in body.messages) // 4 + 4 * len(body.messages)
    return prompt + (body.max_tokens or DEFAULT_COMPLETION_ESTIMATE)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app["gateway"]
    limiter: RateLimiter = request.app["limiter"]
    principal = request.app["auth"].authenticate(request, "chat.completions")
    req = decode_body(await request.read(), ChatCompletionRequest)
    spec = gateway.settings.model(req.model)
    policy = principal.policy(req.model)
    if spec is None or not policy.model_allowed:
        raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have access to it.", param="model")
    body = to_body(req, spec)
    lane = lane_for(req.service_tier, policy)
    admission = await limiter.admit(policy, principal.tenant.id, principal.key.id, estimate_tokens(body))
    reply: _Reply | None = None
    try:
        async with gateway.submit(
            tenant=principal.tenant.id, principal=principal.key.id, model=req.model, lane=lane, kind="chat", body=body
        ) as call:
            reply = _Reply(call, req, tier_of(lane, policy), admission.headers)
            return await (reply.stream(request) if req.stream else reply.whole())
    finally:
        used = reply.final.usage if reply and reply.final else None
        limiter.finish_soon(admission, used.prompt_tokens + used.completion_tokens if used else None)


class _Reply:
    """Turns one call's frames into an OpenAI response, whole or as server-sent events."""

    def __init__(self, call: Call, req: ChatCompletionRequest, tier: str, headers: dict[str, str]):
        self.call, self.req, self.tier, self.headers = call, req, tier, headers
        self.id = "chatcmpl-" + call.envelope.id
        self.created = int(call.envelope.created)
        self.final: Final | None = None

    @staticmethod
    def _usage(final: Final) -> CompletionUsage:
        u = final.usage
        return CompletionUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens)

    async def whole(self) -> web.Response:
        text: list[str] = []
        async for frame in self.call.frames():
            text.append(frame.text)
        self.final = frame
        completion = ChatCompletion(
            self.id, self.created, self.req.model,
            [Choice(AssistantMessage("".join(text)), frame.finish_reason)], self._usage(frame), self.tier,
        )
        return web.Response(body=_encode(completion), content_type="application/json", headers=self.headers)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        chunk_type = ChatCompletionChunkWithUsage if include_usage else ChatCompletionChunk

        def event(choices: list[ChunkChoice], **extra) -> bytes:
            chunk = chunk_type(self.id, self.created, self.req.model, choices, self.tier, **extra)
            return b"data: " + _encode(chunk) + b"\n\n"

        response: web.StreamResponse | None = None
        try:
            async for frame in self.call.frames():
                if response is None:
                    # Headers go out with the first output, so an early failure keeps its real status.
                    response = web.StreamResponse(headers={**SSE_HEADERS, **self.headers})
                    await response.prepare(request)
                    await response.write(event([ChunkChoice(ChunkDelta(role="assistant", content=""))]))
                if frame.text:
                    await response.write(event([ChunkChoice(ChunkDelta(content=frame.text))]))
            self.final = frame
            await response.write(event([ChunkChoice(ChunkDelta(), frame.finish_reason)]))
            if include_usage:
                await response.write(event([], usage=self._usage(frame)))
            await response.write(b"data: [DONE]\n\n")
        except TollgateError as exc:
            if response is None:
                raise
            await response.write(error_event(exc))
        await response.write_eof()
        return response
