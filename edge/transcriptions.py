"""POST /v1/audio/transcriptions and /v1/audio/translations: read the form, check the audio, admit, publish, answer."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bus.blobs import read_result
from bus.openai.audio import (MAX_AUDIO_SECONDS, TranscriptionRequest, TranslationRequest, to_transcription,
                              transcript, transcription_charge)
from bus.openai.service_tier import lane_for
from bus.publisher import Publisher
from edge.admission import Gate
from edge.audio_probe import audio_seconds
from edge.forms import read_form, takes_form
from edge.replies import REQUEST_ID_HEADER, published
from edge.state import AUTH, GATE, PUBLISHER

routes = web.RouteTableDef()
_FILE = frozenset({"file"})


@routes.post("/v1/audio/transcriptions")
@takes_form
async def transcriptions(request: web.Request) -> web.Response:
    """Speech to text in the audio's own language."""
    return await _speech_to_text(request, "audio.transcriptions", TranscriptionRequest)


@routes.post("/v1/audio/translations")
@takes_form
async def translations(request: web.Request) -> web.Response:
    """Speech to English text."""
    return await _speech_to_text(request, "audio.translations", TranslationRequest)


async def _speech_to_text(request: web.Request, endpoint: str, fields: type[TranslationRequest]) -> web.Response:
    publisher: Publisher = request.config_dict[PUBLISHER]
    gate: Gate = request.config_dict[GATE]
    principal = request.config_dict[AUTH].authenticate(request, endpoint)
    form = await read_form(request, file_fields=_FILE)
    req = form.convert(fields)
    spec, policy = gate.model_for(principal, req.model)
    upload = form.file("file")
    body = to_transcription(req, spec, upload.data)
    # Checked and measured before anything is taken: bad audio costs nothing and is never stored.
    seconds = await asyncio.to_thread(audio_seconds, upload.data, MAX_AUDIO_SECONDS)
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy,
                                lane=lane_for(None, policy), charge=transcription_charge(seconds))
    async with published(publisher, gate, admitted, kind="transcription", body=body) as call:
        async for final in call.frames():
            pass  # the text comes whole, in the final frame
        result = await read_result(publisher.js, final) or final.result  # a long transcript comes by blob
        data, content_type = transcript(result, final.usage.prompt_tokens, req.response_format, body)
        headers = {**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id}
        return web.Response(body=data, headers={**headers, "Content-Type": content_type})
