"""POST /v1/completions (legacy): validate, admit, publish, then answer whole or as SSE, as chat does."""

from __future__ import annotations

from aiohttp import web

from bus.openai.completions import CompletionRequest, CompletionResults, charge, to_body
from bus.openai.decoding import decode_json as decode_body
from bus.openai.service_tier import lane_for
from edge.replies import answer
from edge.state import AUTH, GATE, RESPONSE_CACHE

routes = web.RouteTableDef()


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "completions")
    req = decode_body(await request.read(), CompletionRequest)
    spec, policy = gate.model_for(principal, req.model)
    body = to_body(req, spec)  # max_tokens always set (OpenAI's default of 16): a prepaid hold has its bound
    lane = lane_for(None, policy)  # the legacy API has no service_tier
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy, lane=lane,
                                charge=charge(body))
    cache = request.config_dict[RESPONSE_CACHE]
    async with cache.answered(request, principal, spec, admitted, kind="completions", body=body) as call:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        results = CompletionResults(call.envelope, req.model, include_usage)
        return await answer(request, call, results, stream=req.stream, headers=admitted.limits.headers)
