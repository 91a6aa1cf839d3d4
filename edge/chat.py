"""POST /v1/chat/completions: validate, admit, publish, then answer whole or as SSE."""

from __future__ import annotations

from aiohttp import web

from bus.openai.chat import ChatCompletionRequest, ChatResults, charge, image_refs, prepaid_body, to_body
from bus.openai.decoding import decode_json as decode_body
from bus.openai.service_tier import lane_for, tier_of
from edge.replies import answer
from edge.state import AUTH, GATE, IMAGE_INPUTS, RESPONSE_CACHE

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "chat.completions")
    req = decode_body(await request.read(), ChatCompletionRequest)
    spec, policy = gate.model_for(principal, req.model)
    images = await request.config_dict[IMAGE_INPUTS].load(image_refs(req, spec))  # 400s before admission
    body = to_body(req, spec, images)
    if policy.prepaid:
        body = prepaid_body(body, spec)
    lane = lane_for(req.service_tier, policy)
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy, lane=lane,
                                charge=charge(body))
    cache = request.config_dict[RESPONSE_CACHE]
    async with cache.answered(request, principal, spec, admitted, kind="chat", body=body) as call:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        results = ChatResults(call.envelope, req.model, tier_of(lane, policy.default_lane), include_usage)
        return await answer(request, call, results, stream=req.stream, headers=admitted.limits.headers)
