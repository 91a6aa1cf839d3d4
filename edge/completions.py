"""POST /v1/completions (legacy): validate, admit, publish, then answer whole or as SSE, as chat does."""

from __future__ import annotations

import time

from aiohttp import web

from bus.errors import ModelNotFound
from bus.ids import new_request_id
from bus.openai.completions import CompletionRequest, CompletionResults, charge, to_body
from bus.openai.decoding import decode_json as decode_body
from bus.openai.service_tier import lane_for
from edge.replies import answer, published
from edge.state import AUTH, GATE, PUBLISHER, SETTINGS

routes = web.RouteTableDef()


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    publisher = request.config_dict[PUBLISHER]
    gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "completions")
    req = decode_body(await request.read(), CompletionRequest)
    spec = request.config_dict[SETTINGS].model(req.model)
    policy = principal.policy(req.model)
    if spec is None or not policy.model_allowed:
        raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have access to it.", param="model")
    body = to_body(req, spec)  # max_tokens always set (OpenAI's default of 16): a prepaid hold has its bound
    lane = lane_for(None, policy)  # the legacy API has no service_tier
    publisher.check_serving(req.model)  # before admission: a 503 costs the caller no quota
    admitted = await gate.admit(
        request_id=new_request_id(), tenant=principal.tenant.id, key=principal.key.id, policy=policy, spec=spec,
        lane=lane, charge=charge(body), deadline=time.time() + publisher.deadline_s,
    )
    async with published(publisher, gate, admitted, principal=principal.key.id, model=req.model, lane=lane,
                         kind="completions", body=body) as call:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        results = CompletionResults(call.envelope, req.model, include_usage)
        return await answer(request, call, results, stream=req.stream, headers=admitted.limits.headers)
