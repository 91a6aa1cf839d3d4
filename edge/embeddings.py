"""POST /v1/embeddings: validate, admit, publish, answer from the final frame."""

from __future__ import annotations

import msgspec
from aiohttp import web

from bus.blobs import read_result
from bus.openai.decoding import decode_json as decode_body
from bus.openai.embeddings import EmbeddingsRequest, charge, response, to_body
from bus.openai.service_tier import lane_for
from bus.publisher import Publisher
from edge.admission import Gate
from edge.replies import REQUEST_ID_HEADER, published
from edge.state import AUTH, GATE, PUBLISHER

_encode = msgspec.json.Encoder().encode

routes = web.RouteTableDef()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    publisher: Publisher = request.config_dict[PUBLISHER]
    gate: Gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "embeddings")
    req = decode_body(await request.read(), EmbeddingsRequest)
    spec, policy = gate.model_for(principal, req.model)
    body = to_body(req, spec)
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy,
                                lane=lane_for(None, policy), charge=charge(body))
    async with published(publisher, gate, admitted, kind="embeddings", body=body) as call:
        async for final in call.frames():
            pass  # embeddings send no deltas: the one frame is the final one
        result = await read_result(publisher.js, final) or final.result  # many vectors come by blob
        headers = {**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id}
        answer = response(final, result, call.envelope.model, req.encoding_format)  # a route's target: who served it
        return web.Response(body=_encode(answer), content_type="application/json", headers=headers)
