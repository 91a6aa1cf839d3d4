"""POST /v1/chat/completions: validate, admit, publish, then answer whole or as SSE."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
from aiohttp import web

from bus.openai.chat import ChatResults, charge, prepaid_body, to_body
from bus.errors import ModelNotFound, NoCapacity, TollgateError
from bus.ids import new_request_id
from bus.openai.chat import ChatCompletionRequest
from bus.publisher import Call, Publisher
from bus.openai.service_tier import lane_for, tier_of
from bus.openai.decoding import decode_json as decode_body
from edge.admission import Gate
from edge.errors import error_event
from edge.state import AUTH, GATE, PUBLISHER, SETTINGS

_encode = msgspec.json.Encoder().encode
REQUEST_ID_HEADER = "x-request-id"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    publisher: Publisher = request.config_dict[PUBLISHER]
    gate: Gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "chat.completions")
    req = decode_body(await request.read(), ChatCompletionRequest)
    spec = request.config_dict[SETTINGS].model(req.model)
    policy = principal.policy(req.model)
    if spec is None or not policy.model_allowed:
        raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have access to it.", param="model")
    body = to_body(req, spec)
    lane = lane_for(req.service_tier, policy)
    publisher.check_serving(req.model)  # before admission: a 503 costs the caller no quota
    if policy.prepaid:
        body = prepaid_body(body, spec)
    admitted = await gate.admit(
        request_id=new_request_id(), tenant=principal.tenant.id, key=principal.key.id, policy=policy, spec=spec,
        lane=lane, charge=charge(body), deadline=time.time() + publisher.deadline_s,
    )
    call: Call | None = None
    queued = True  # unknown counts as queued: then billing settles or sweeps the hold, never twice
    try:
        async with publisher.submit(
            tenant=admitted.tenant, principal=principal.key.id, model=req.model, lane=lane, kind="chat",
            body=body, request_id=admitted.request_id, hold_micros=admitted.hold,
        ) as call:
            headers = {**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id}
            reply = _Reply(call, req, tier_of(lane, policy.default_lane), headers)
            return await (reply.stream(request) if req.stream else reply.whole())
    except TollgateError as exc:
        if call is not None:
            exc.request_id = call.envelope.id  # the error response names the request, as a success would
        else:
            queued = not isinstance(exc, NoCapacity)  # no worker left, or the lane full
        raise
    except nats.errors.MaxPayloadError:
        queued = False  # never sent: edge.errors answers it 413
        raise
    finally:
        used = call.final.usage if call and call.final else None
        # Without a final frame the tokens used are unknown: the estimate is given back. A request
        # refused before it was queued (no worker left, lane full) gets its hold back at once.
        release = gate.release(admitted, published=queued,
                               used_tokens=used.prompt_tokens + used.completion_tokens if used else 0)
        await asyncio.shield(release)


class _Reply:
    """Turns one call's frames into an OpenAI response, whole or as server-sent events."""

    def __init__(self, call: Call, req: ChatCompletionRequest, tier: str, headers: dict[str, str]):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.call, self.headers = call, headers
        self.results = ChatResults(call.envelope, req.model, tier, include_usage)

    async def whole(self) -> web.Response:
        text: list[str] = []
        async for frame in self.call.frames():
            text.append(frame.text)
        body = _encode(self.results.completion("".join(text), frame))
        return web.Response(body=body, content_type="application/json", headers=self.headers)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        def event(chunk) -> bytes:
            return b"data: " + _encode(chunk) + b"\n\n"

        response: web.StreamResponse | None = None
        try:
            async for frame in self.call.frames():
                if response is None:
                    # Headers go out with the first output, so an early failure keeps its real status.
                    response = web.StreamResponse(headers={**SSE_HEADERS, **self.headers})
                    await response.prepare(request)
                    await response.write(event(self.results.opening()))
                if frame.text:
                    await response.write(event(self.results.delta(frame.text)))
            for chunk in self.results.closing(frame):
                await response.write(event(chunk))
            await response.write(b"data: [DONE]\n\n")
        except TollgateError as exc:
            if response is None:
                raise
            await response.write(error_event(exc))
        await response.write_eof()
        return response
