"""POST /v1/embeddings: validate, admit, publish, answer from the final frame."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
from aiohttp import web

from bus.blobs import read_result
from bus.errors import ModelNotFound, NoCapacity, TollgateError
from bus.ids import new_request_id
from bus.openai.decoding import decode_json as decode_body
from bus.openai.embeddings import EmbeddingsRequest, charge, response, to_body
from bus.openai.service_tier import lane_for
from bus.publisher import Call, Publisher
from edge.admission import Gate
from edge.replies import REQUEST_ID_HEADER
from edge.state import AUTH, GATE, PUBLISHER, SETTINGS

_encode = msgspec.json.Encoder().encode

routes = web.RouteTableDef()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    publisher: Publisher = request.config_dict[PUBLISHER]
    gate: Gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "embeddings")
    req = decode_body(await request.read(), EmbeddingsRequest)
    spec = request.config_dict[SETTINGS].model(req.model)
    policy = principal.policy(req.model)
    if spec is None or not policy.model_allowed:
        raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have access to it.", param="model")
    body = to_body(req, spec)
    lane = lane_for(None, policy)
    publisher.check_serving(req.model)  # before admission: a 503 costs the caller no quota
    admitted = await gate.admit(
        request_id=new_request_id(), tenant=principal.tenant.id, key=principal.key.id, policy=policy, spec=spec,
        lane=lane, charge=charge(body), deadline=time.time() + publisher.deadline_s,
    )
    call: Call | None = None
    queued = True  # unknown counts as queued: then billing settles or sweeps the hold, never twice
    try:
        async with publisher.submit(
            tenant=admitted.tenant, principal=principal.key.id, model=req.model, lane=lane, kind="embeddings",
            body=body, request_id=admitted.request_id, hold_micros=admitted.hold,
        ) as call:
            async for final in call.frames():
                pass  # embeddings send no deltas: the one frame is the final one
            result = await read_result(publisher.js, final) or final.result  # many vectors come by blob
            headers = {**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id}
            answer = response(final, result, req.model, req.encoding_format)
            return web.Response(body=_encode(answer), content_type="application/json", headers=headers)
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
        release = gate.release(admitted, published=queued, used_tokens=used.prompt_tokens if used else 0)
        await asyncio.shield(release)
