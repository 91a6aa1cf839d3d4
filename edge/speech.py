"""POST /v1/audio/speech: validate, admit, publish, and stream the audio to the client as the worker makes it."""

from __future__ import annotations

import logging

from aiohttp import web

from bus.errors import TollgateError
from bus.openai.audio import SPEECH_CONTENT_TYPES, SpeechRequest, speech_charge, to_speech
from bus.openai.decoding import decode_json as decode_body
from bus.openai.service_tier import lane_for
from bus.protocol import Chunk
from bus.publisher import Publisher
from edge.admission import Gate
from edge.replies import REQUEST_ID_HEADER, published
from edge.state import AUTH, GATE, PUBLISHER

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.StreamResponse:
    """Text to speech: the encoded audio, written to the client chunk by chunk as it arrives from the worker."""
    publisher: Publisher = request.config_dict[PUBLISHER]
    gate: Gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, "audio.speech")
    req = decode_body(await request.read(), SpeechRequest)
    spec, policy = gate.model_for(principal, req.model)
    body = to_speech(req, spec)
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy,
                                lane=lane_for(None, policy), charge=speech_charge(body))
    async with published(publisher, gate, admitted, kind="speech", body=body) as call:
        response = web.StreamResponse(headers={**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id,
                                               "Content-Type": SPEECH_CONTENT_TYPES[body.response_format]})
        try:
            async for frame in call.frames():
                if not response.prepared:  # headers go out with the first audio: an earlier error keeps its status
                    await response.prepare(request)
                if isinstance(frame, Chunk):
                    await response.write(frame.data)
        except TollgateError as exc:
            if not response.prepared:
                raise
            # Past the headers the status cannot change: the connection is cut, so the client sees a
            # truncated body rather than audio that seems whole.
            log.warning("speech request %s failed mid-stream: %s", call.envelope.id, exc.message)
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response
