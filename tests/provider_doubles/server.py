"""One aiohttp server speaking OpenAI's (under /openai/v1), Anthropic's (/anthropic/v1) and Gemini's
(/gemini/v1beta) APIs, as strictly as the providers check what they receive: the auth header and
version, the content type, the required fields and their types. It streams as each provider
does. Tests script failures per upstream model (``Double.plan``) and read what it received.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import wave
from collections import defaultdict, deque
from dataclasses import dataclass, field
from functools import partial

from aiohttp import web
from PIL import Image

KEYS = {"openai": "sk-test-openai-5f1d9c", "anthropic": "sk-ant-test-77ab31", "gemini": "AIza-test-gemini-42"}
ANTHROPIC_VERSION = "2023-06-01"
CACHED = 2  # prompt tokens each answer reports as read from the provider's prompt cache
HEARD = "the double heard you"  # what every transcription says
SPEECH_RATE = 24_000  # OpenAI's pcm: 16-bit little-endian mono at 24 kHz
SPEECH_SAMPLES_PER_CHARACTER = 240  # 10 ms of tone a character read
AUDIO_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")


@dataclass
class Behaviour:
    """How the double answers one request: ``ok``; ``status`` (with ``retry_after``); ``slow`` (no
    first byte for ``delay`` s); ``drop`` (a stream cut after ``pieces`` pieces, 0: before any); ``hold``
    (speech: the first piece sent, the rest once ``gate`` is set)."""

    kind: str = "ok"
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    pieces: int = 0
    gate: asyncio.Event | None = None


@dataclass
class Double:
    plans: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: list[dict] = field(default_factory=list)  # every request's headers and body, for the key checks

    def plan(self, model: str, *behaviours: Behaviour) -> None:
        self.plans[model].extend(behaviours)

    def reset(self) -> None:
        self.plans.clear()
        self.calls.clear()

    def next(self, model: str) -> Behaviour:
        self.calls[model] += 1
        return self.plans[model].popleft() if self.plans[model] else Behaviour()


def _refuse(status: int, message: str, api: str, retry_after: str | None = None) -> web.Response:
    if api == "anthropic":
        kinds = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                 529: "overloaded_error"}
        body = {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
    elif api == "gemini":
        body = {"error": {"code": status, "message": message, "status": "INVALID_ARGUMENT"}}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.json_response(body, status=status, headers=headers)


class Invalid(Exception):
    """What a provider answers 400 to."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise Invalid(message)


def _words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def reply_to(last: str) -> list[str]:
    """What every double answers: the last user message echoed, a word a piece."""
    return [w + " " for w in ("Echo: " + last).split()]


def tone(characters: int) -> bytes:
    """What the double's speech says for an input of ``characters``: PCM of a tone, 10 ms a character."""
    samples = range(characters * SPEECH_SAMPLES_PER_CHARACTER)
    return b"".join(int(8000 * math.sin(i / 8)).to_bytes(2, "little", signed=True) for i in samples)


def make_app(double: Double) -> web.Application:
    async def read(request: web.Request, seen: dict) -> dict:
        if request.content_type == "multipart/form-data":  # what the audio and image edit endpoints take
            form = await request.post()
            body = seen["body"] = {k: form.getall(k) if k.endswith("[]") else form[k] for k in form}
            return body
        _require(request.content_type == "application/json", "Content-Type must be application/json")
        body = seen["body"] = await request.json()
        _require(isinstance(body, dict), "the body must be a JSON object")
        return body

    def authorized(request: web.Request, api: str) -> str | None:
        if api == "openai":
            sent = request.headers.get("Authorization", "")
            return None if sent == f"Bearer {KEYS[api]}" else f"Incorrect API key provided: {sent.removeprefix('Bearer ')}."
        if api == "anthropic":
            if request.headers.get("anthropic-version") != ANTHROPIC_VERSION:
                return "anthropic-version header is required"
            return None if request.headers.get("x-api-key") == KEYS[api] else "invalid x-api-key"
        return None if request.headers.get("x-goog-api-key") == KEYS[api] else "API key not valid. Please pass a valid API key."

    async def handle(request: web.Request, api: str, model: str | None, respond) -> web.StreamResponse:
        seen = {"headers": dict(request.headers), "path": request.path}
        double.received.append(seen)
        problem = authorized(request, api)
        if problem:
            return _refuse(403 if api == "gemini" else 401, problem, api)
        try:
            body = await read(request, seen)
            model = model or body.get("model")
            _require(isinstance(model, str) and model, "model is required")
            behaviour = double.next(model)
            if behaviour.kind == "status":
                return _refuse(behaviour.status, f"scripted {behaviour.status}", api, behaviour.retry_after)
            if behaviour.kind == "slow":
                await asyncio.sleep(behaviour.delay)
            return await respond(request, body, model, behaviour)
        except Invalid as exc:
            return _refuse(400, str(exc), api)

    # -- OpenAI -------------------------------------------------------------------

    def openai_sampling(body: dict) -> None:
        _require(body.get("max_tokens") is None or (isinstance(body["max_tokens"], int) and body["max_tokens"] >= 1),
                 "max_tokens must be a positive integer")
        _require(isinstance(body.get("stream", False), bool), "stream must be a boolean")
        _require("stream_options" not in body or body.get("stream") is True,
                 "stream_options is only allowed when stream is true")
        _require(0 <= body.get("temperature", 1) <= 2, "temperature must be between 0 and 2")

    async def openai_stream(request, model, pieces, usage, behaviour, obj, piece_of) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        base = {"id": "x-1", "object": obj, "created": 1, "model": model}
        if obj == "chat.completion.chunk":
            await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
        for i, piece in enumerate(pieces):
            if behaviour.kind == "drop" and i == behaviour.pieces:
                request.transport.close()
                return response
            await send({**base, "choices": [{"index": 0, **piece_of(piece), "finish_reason": None}]})
        await send({**base, "choices": [{"index": 0, **piece_of(""), "finish_reason": "stop"}]})
        if usage is not None:
            await send({**base, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response

    def openai_usage(prompt: int, pieces: list[str]) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces),
                "prompt_tokens_details": {"cached_tokens": CACHED}}

    async def chat(request, body, model, behaviour):
        messages = body.get("messages")
        _require(isinstance(messages, list) and messages, "messages must be a non-empty array")
        for m in messages:
            _require(m.get("role") in ("system", "developer", "user", "assistant", "tool"), "invalid role")
            _require(isinstance(m.get("content"), str), "content must be a string")
        openai_sampling(body)
        pieces = reply_to(messages[-1]["content"])[: body.get("max_tokens") or None]
        usage = openai_usage(_words([m["content"] for m in messages]) + 3, pieces)
        if body.get("stream"):
            include = (body.get("stream_options") or {}).get("include_usage")
            return await openai_stream(request, model, pieces, usage if include else None, behaviour,
                                       "chat.completion.chunk", lambda p: {"delta": {"content": p} if p else {}})
        return web.json_response({"id": "x-1", "object": "chat.completion", "created": 1, "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                               "finish_reason": "stop"}], "usage": usage})

    async def completions(request, body, model, behaviour):
        _require(isinstance(body.get("prompt"), str), "prompt must be a string")
        openai_sampling(body)
        pieces = reply_to(body["prompt"])[: body.get("max_tokens") or None]
        if body.get("echo"):
            pieces = [body["prompt"], *pieces]
        usage = openai_usage(_words([body["prompt"]]) + 1, pieces)
        if body.get("stream"):
            include = (body.get("stream_options") or {}).get("include_usage")
            return await openai_stream(request, model, pieces, usage if include else None, behaviour,
                                       "text_completion", lambda p: {"text": p})
        return web.json_response({"id": "x-1", "object": "text_completion", "created": 1, "model": model,
                                  "choices": [{"index": 0, "text": "".join(pieces), "finish_reason": "stop"}],
                                  "usage": usage})

    async def embeddings(request, body, model, behaviour):
        inputs = body.get("input")
        _require(isinstance(inputs, (str, list)) and inputs, "input is required")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        _require(body.get("encoding_format", "float") in ("float", "base64"), "invalid encoding_format")
        size = body.get("dimensions", 8)
        data = [{"object": "embedding", "index": i, "embedding": [float(len(str(x)) + j) for j in range(size)]}
                for i, x in enumerate(inputs)]
        tokens = _words([x for x in inputs if isinstance(x, str)]) + sum(len(x) for x in inputs if isinstance(x, list))
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def upload(body: dict, name: str, extensions: tuple[str, ...]) -> bytes:
        """A multipart file field, whose name's extension says its format (as OpenAI reads it)."""
        field = body.get(name)
        _require(isinstance(field, web.FileField), f"{name} is required and must be a file")
        _require(field.filename.rpartition(".")[2] in extensions,
                 f"Invalid file format. Supported formats: {list(extensions)}")
        return field.file.read()

    async def transcriptions(request, body, model, behaviour):
        audio = upload(body, "file", AUDIO_EXTENSIONS)
        _require(body.get("response_format", "json") in ("json", "text", "srt", "verbose_json", "vtt"),
                 "invalid response_format")
        granularities = body.get("timestamp_granularities[]", [])
        _require(set(granularities) <= {"word", "segment"}, "invalid timestamp_granularities")
        _require(not granularities or body.get("response_format") == "verbose_json",
                 "timestamp_granularities requires response_format verbose_json")
        _require(request.path.endswith("/transcriptions") or "language" not in body, "language is not allowed")
        _require(body["file"].filename.endswith(".wav"), "this double hears wav only")
        with wave.open(io.BytesIO(audio)) as heard:
            duration = heard.getnframes() / heard.getframerate()
        text = HEARD if request.path.endswith("/transcriptions") else "translated: " + HEARD
        if body.get("response_format", "json") != "verbose_json":
            return web.json_response({"text": text})
        answer = {"task": "transcribe", "language": "english", "duration": duration, "text": text}
        if not granularities or "segment" in granularities:
            answer["segments"] = [{"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": [50364, 1],
                                   "temperature": 0.0, "avg_logprob": -0.25, "compression_ratio": 1.1,
                                   "no_speech_prob": 0.01}]
        if "word" in granularities:
            step = duration / len(text.split())
            answer["words"] = [{"word": w, "start": i * step, "end": (i + 1) * step}
                               for i, w in enumerate(text.split())]
        return web.json_response(answer)

    async def speech(request, body, model, behaviour):
        _require(isinstance(body.get("input"), str) and 0 < len(body["input"]) <= 4096, "input is required")
        _require(isinstance(body.get("voice"), str) and body["voice"], "voice is required")
        _require(body.get("response_format", "mp3") in ("mp3", "opus", "aac", "flac", "wav", "pcm"),
                 "invalid response_format")
        _require(0.25 <= body.get("speed", 1.0) <= 4.0, "speed must be between 0.25 and 4")
        _require(body.get("response_format") == "pcm", "this double speaks pcm only")
        pcm = tone(len(body["input"]))
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await response.prepare(request)
        for start in range(0, len(pcm), 4801):  # odd-sized pieces: samples split between them, as networks do
            if behaviour.kind == "hold" and start:
                await behaviour.gate.wait()
            await response.write(pcm[start:start + 4801])
        return response

    def drawn(body: dict, model: str) -> web.Response:
        _require(isinstance(body.get("prompt"), str) and body["prompt"], "prompt is required")
        size = re.fullmatch(r"(\d+)x(\d+)", str(body.get("size", "1024x1024")))
        _require(size is not None, "invalid size")
        n = int(body.get("n", 1))
        _require(1 <= n <= 10, "n must be between 1 and 10")
        _require(body.get("response_format") in ("url", "b64_json"), "invalid response_format")
        _require(body["response_format"] == "b64_json", "this double answers b64_json only")
        data = []
        for i in range(n):
            png = io.BytesIO()
            Image.new("RGB", (int(size[1]), int(size[2])), (40 * i, 90, 200)).save(png, format="PNG")
            data.append({"b64_json": base64.b64encode(png.getvalue()).decode()})
        return web.json_response({"created": 1, "data": data})

    async def generations(request, body, model, behaviour):
        _require(isinstance(body.get("n", 1), int), "n must be an integer")
        return drawn(body, model)

    async def edits(request, body, model, behaviour):
        image = upload(body, "image", ("png", "jpeg", "jpg", "webp"))
        if "mask" in body:
            mask = upload(body, "mask", ("png",))
            _require(Image.open(io.BytesIO(mask)).size == Image.open(io.BytesIO(image)).size,
                     "mask must be the image's size")
        return drawn(body, model)

    # -- Anthropic ----------------------------------------------------------------

    async def messages(request, body, model, behaviour):
        _require(isinstance(body.get("max_tokens"), int) and body["max_tokens"] >= 1, "max_tokens: Field required")
        turns = body.get("messages")
        _require(isinstance(turns, list) and turns, "messages: at least one message is required")
        for m in turns:
            _require(m.get("role") in ("user", "assistant"), "messages: roles must be user or assistant")
            _require(isinstance(m.get("content"), (str, list)), "messages: content is required")
        _require(isinstance(body.get("system", ""), str), "system must be a string")
        _require(0 <= body.get("temperature", 1) <= 1, "temperature: must be less than or equal to 1")
        unknown = set(body) - {"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k",
                               "stop_sequences", "stream", "metadata"}
        _require(not unknown, f"{sorted(unknown)}: Extra inputs are not permitted")
        pieces = reply_to(turns[-1]["content"])[: body["max_tokens"]]
        prompt = _words([m["content"] for m in turns] + [body.get("system", "")]) + 4
        stop = "max_tokens" if len(pieces) == body["max_tokens"] else "end_turn"
        usage = {"input_tokens": prompt - CACHED, "output_tokens": len(pieces), "cache_read_input_tokens": CACHED,
                 "cache_creation_input_tokens": 0}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "stop_sequence": None}
        if not body.get("stream"):
            return web.json_response({**message, "content": [{"type": "text", "text": "".join(pieces)}],
                                      "stop_reason": stop, "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(event: str, payload: dict) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps({'type': event, **payload})}\n\n".encode())
        await send("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                                 "usage": {**usage, "output_tokens": 1}}})
        await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await send("ping", {})
        for i, piece in enumerate(pieces):
            if behaviour.kind == "drop" and i == behaviour.pieces:
                request.transport.close()
                return response
            await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        await send("content_block_stop", {"index": 0})
        await send("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": len(pieces)}})
        await send("message_stop", {})
        return response

    # -- Gemini -------------------------------------------------------------------

    async def generate(request, body, model, behaviour):
        contents = body.get("contents")
        _require(isinstance(contents, list) and contents, "contents is not specified")
        for c in contents:
            _require(c.get("role") in ("user", "model"), "Please use a valid role: user, model.")
            _require(all(isinstance(p.get("text"), str) for p in c.get("parts", [])), "parts must hold text")
        config = body.get("generationConfig", {})
        unknown = set(config) - {"maxOutputTokens", "temperature", "topP", "topK", "stopSequences", "seed"}
        _require(not unknown, f"Invalid JSON payload received. Unknown name {sorted(unknown)}")
        unknown = set(body) - {"contents", "systemInstruction", "generationConfig", "safetySettings"}
        _require(not unknown, f"Invalid JSON payload received. Unknown name {sorted(unknown)}")
        texts = [p["text"] for c in contents for p in c["parts"]]
        pieces = reply_to(contents[-1]["parts"][-1]["text"])[: config.get("maxOutputTokens") or None]
        usage = {"promptTokenCount": _words(texts) + 2, "candidatesTokenCount": len(pieces),
                 "totalTokenCount": _words(texts) + 2 + len(pieces), "cachedContentTokenCount": CACHED}
        finish = "MAX_TOKENS" if len(pieces) == config.get("maxOutputTokens") else "STOP"

        def candidate(text: str, done: bool) -> dict:
            c = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
            return {**c, "finishReason": finish} if done else c
        if request.path.endswith(":generateContent"):
            return web.json_response({"candidates": [candidate("".join(pieces), True)], "usageMetadata": usage,
                                      "modelVersion": model})
        _require(request.query.get("alt") == "sse", "streaming over this double needs alt=sse")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, piece in enumerate(pieces):
            if behaviour.kind == "drop" and i == behaviour.pieces:
                request.transport.close()
                return response
            last = i == len(pieces) - 1
            chunk = {"candidates": [candidate(piece, last)], "modelVersion": model,
                     "usageMetadata": usage if last else {"promptTokenCount": usage["promptTokenCount"]}}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
        return response

    async def gemini(request: web.Request) -> web.StreamResponse:
        name, _, method = request.match_info["call"].partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            return _refuse(404, f"method {method} not found", "gemini")
        return await handle(request, "gemini", name, generate)

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_post("/openai/v1/chat/completions", partial(handle, api="openai", model=None, respond=chat))
    app.router.add_post("/openai/v1/completions", partial(handle, api="openai", model=None, respond=completions))
    app.router.add_post("/openai/v1/embeddings", partial(handle, api="openai", model=None, respond=embeddings))
    for path, respond in (("audio/transcriptions", transcriptions), ("audio/translations", transcriptions),
                          ("audio/speech", speech), ("images/generations", generations), ("images/edits", edits)):
        app.router.add_post(f"/openai/v1/{path}", partial(handle, api="openai", model=None, respond=respond))
    app.router.add_post("/anthropic/v1/messages", partial(handle, api="anthropic", model=None, respond=messages))
    app.router.add_post("/gemini/v1beta/models/{call}", gemini)
    return app


async def start(double: Double, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(double), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
