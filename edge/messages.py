"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat kind.

The same admission, publishing and answering as /v1/chat/completions (a Messages request is a
``ChatBody`` on the bus); only the wire format differs: Anthropic's message and named stream
events, and Anthropic-shaped errors (``edge.errors`` shapes every error on these paths).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from bus.anthropic.messages import CountTokensRequest, MessagesRequest, MessagesResults, TokenCount, chat_messages, to_body
from bus.openai.chat import charge
from bus.openai.decoding import decode_json as decode_body
from bus.openai.service_tier import lane_for
from bus.protocol import TokenizeAsk
from edge.errors import anthropic_error_event
from edge.replies import Events, answer
from edge.state import AUTH, GATE, RESPONSE_CACHE
from edge.tokenize import ask_worker

_encode = msgspec.json.Encoder().encode
# Anthropic's clients read the request's id from this header.
REQUEST_ID_HEADER = "request-id"

routes = web.RouteTableDef()


def _named_event(event: msgspec.Struct) -> bytes:
    """An Anthropic stream event: named by its ``type``, which its data carries too."""
    return b"event: " + type(event).__struct_config__.tag.encode() + b"\ndata: " + _encode(event) + b"\n\n"


# Anthropic's streams end with message_stop: no [DONE] after it.
ANTHROPIC_EVENTS = Events(_named_event, b"", anthropic_error_event)


@routes.post("/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "messages")
    req = decode_body(await request.read(), MessagesRequest)
    spec, policy = gate.model_for(principal, req.model)
    body = to_body(req, spec)  # max_tokens is required: a prepaid hold always has its bound
    lane = lane_for(None, policy)
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy, lane=lane,
                                charge=charge(body))
    cache = request.config_dict[RESPONSE_CACHE]
    async with cache.answered(request, principal, spec, admitted, kind="chat", body=body) as call:
        headers = {**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id}
        return await answer(request, call, MessagesResults(call.envelope, req.model), stream=req.stream,
                            headers=headers, events=ANTHROPIC_EVENTS)


@routes.post("/v1/messages/count_tokens")
async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's tokens as the model counts them: the chat template applied, as /v1/messages reads it."""
    principal = request.config_dict[AUTH].authenticate(request, "messages")
    req = decode_body(await request.read(), CountTokensRequest)
    asked = TokenizeAsk(messages=chat_messages(req.system, req.messages))
    tokens = await ask_worker(request, principal, req.model, asked)
    return web.Response(body=_encode(TokenCount(len(tokens.tokens))), content_type="application/json")
