"""POST /v1/tokenize and /v1/detokenize: asked of a worker of the model over core NATS request-reply.

The edge holds no model code, so a worker of the model answers on ``tg.tokenize.<model>``
(``consumers.tokenize_service``), beside its work queue, never behind a generation. Not
billed (no usage event: nothing is generated), but admitted like every request, with a
charge of no tokens: it counts against requests per minute and in-flight limits, and a
hard budget that is spent refuses it too.
"""

from __future__ import annotations

import msgspec
import nats.errors
from aiohttp import web

from bus.account.prices import Charge, Units
from bus.errors import NoCapacity, TollgateError
from bus.openai.decoding import decode_json as decode_body
from bus.openai.service_tier import lane_for
from bus.openai.tokenize import (
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, check_model, detokenize_ask,
    tokenize_ask,
)
from bus.protocol import TokenizeAnswer, TokenizerAsk
from bus.subjects import tokenize_subject
from edge.auth import Principal
from edge.state import AUTH, GATE, PUBLISHER, SETTINGS

# A worker answers in milliseconds; past this no worker is answering.
ASK_TIMEOUT_S = 5.0
_FREE = Charge(tokens=0, max_units=Units())
_answer = msgspec.msgpack.Decoder(TokenizeAnswer).decode
_encode = msgspec.json.Encoder().encode

routes = web.RouteTableDef()


@routes.post("/v1/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    principal = request.config_dict[AUTH].authenticate(request, "tokenize")
    req = decode_body(await request.read(), TokenizeRequest)
    answer = await ask_worker(request, principal, req.model, tokenize_ask(req))
    context = request.config_dict[SETTINGS].models[req.model].context_tokens
    return _json(TokenizeResponse(answer.tokens, len(answer.tokens), context))


@routes.post("/v1/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    principal = request.config_dict[AUTH].authenticate(request, "tokenize")
    req = decode_body(await request.read(), DetokenizeRequest)
    answer = await ask_worker(request, principal, req.model, detokenize_ask(req))
    return _json(DetokenizeResponse(answer.text))


async def ask_worker(request: web.Request, principal: Principal, model: str, ask: TokenizerAsk) -> TokenizeAnswer:
    """Admit (no tokens charged) and ask a worker of ``model``; its error is raised."""
    publisher = request.config_dict[PUBLISHER]
    gate = request.config_dict[GATE]
    spec, policy = gate.model_for(principal, model)
    check_model(model, spec)
    admitted = await gate.admit(principal=principal, model=model, spec=spec, policy=policy,
                                lane=lane_for(None, policy), charge=_FREE, deadline_s=ASK_TIMEOUT_S)
    try:
        reply = await publisher.nc.request(tokenize_subject(model), msgspec.msgpack.encode(ask), timeout=ASK_TIMEOUT_S)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise NoCapacity(f"No worker of the model '{model}' answered. Try again shortly.") from None
    finally:
        await gate.release(admitted, published=False)  # nothing held: this only frees the slots
    answer = _answer(reply.data)
    if answer.error is not None:
        raise TollgateError.from_info(answer.error)
    return answer


def _json(value: msgspec.Struct) -> web.Response:
    return web.Response(body=_encode(value), content_type="application/json")
