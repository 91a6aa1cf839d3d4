"""Kinds of work: how a backend runs a request's body, and what its result is billed as.

The runtime (``consumers.runtime``) is the same for every kind: verify, run,
stream, meter, ack. A kind adds only what differs: which backend method runs
its body, which frames carry its output, and the units its usage is priced in
(``bus.account.prices.Units``). A backend declares the kinds it serves in its
``kinds`` attribute; a new kind is one class here, registered in ``KINDS``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import msgspec

from bus.account.prices import Units
from bus.protocol import (ChatBody, CompletionBody, EmbeddingsBody, EmbeddingsResult, ImagesBody, ImagesResult,
                          SpeechBody, TranscriptionBody, encode)
from consumers.audio_encoding import AudioEncoder
from consumers.backends.base import ChatResult



class Output(Protocol):
    """Where a kind streams what the client may see before the final frame."""

    async def text(self, text: str) -> None:
        """Send a piece of text (a ``Delta`` frame)."""
        ...

    async def data(self, data: bytes) -> None:
        """Send a piece of binary output (a ``Chunk`` frame), encoded audio say."""
        ...


@dataclass
class Outcome:
    """What running one request produced: how it ended, what the final frame carries, what it is billed."""

    finish_reason: str  # stop | length | cancelled
    units: Units = field(default_factory=Units)  # priced with the model's table
    input_units: int = 0  # as the usage row counts them, in ``unit``
    output_units: int = 0
    unit: str = "tokens"
    first_output_at: float | None = None
    text: str = ""  # output not yet streamed as deltas
    result: bytes = b""  # a kind's own encoded result (vectors, say), for the final frame
    stop: str | None = None  # the stop sequence that ended a generation, when one did


class Kind(Protocol):
    name: str

    async def execute(self, backend, body, cancel: asyncio.Event, out: Output) -> Outcome:
        """Run ``body`` on ``backend``, streaming to ``out`` what the client may see early; stop soon after ``cancel``."""
        ...


class Chat:
    """Chat completions: text streamed as it is generated, priced per prompt and completion token, and per
    image a vision model read."""

    name = "chat"

    async def execute(self, backend, body: ChatBody, cancel: asyncio.Event, out: Output) -> Outcome:
        outcome = await _generated(backend.chat(body, cancel), body.stream, out)
        if images := sum(len(m.images) for m in body.messages):  # read before any token was made
            outcome.units = msgspec.structs.replace(outcome.units, input_images=images)
        return outcome


class Completions:
    """Legacy text completions: generated like chat, from the raw prompt."""

    name = "completions"

    async def execute(self, backend, body: CompletionBody, cancel: asyncio.Event, out: Output) -> Outcome:
        return await _generated(backend.complete(body, cancel), body.stream, out)


async def _generated(items: AsyncIterator[str | ChatResult], stream: bool, out: Output) -> Outcome:
    """A text generation's outcome: pieces streamed as deltas (or held for the final frame), tokens billed."""
    result, first, held = ChatResult("cancelled", 0, 0), None, []
    async for item in items:
        if isinstance(item, ChatResult):
            result = item
            continue
        first = first or time.time()
        if stream:
            await out.text(item)
        else:
            held.append(item)  # one final frame instead of a message per token
    return Outcome(
        finish_reason=result.finish_reason,
        units=Units(input_tokens=result.prompt_tokens, cached_input_tokens=result.cached_prompt_tokens,
                    output_tokens=result.completion_tokens),
        input_units=result.prompt_tokens, output_units=result.completion_tokens, unit="tokens",
        first_output_at=first, text="".join(held), stop=result.stop,
    )


class Embeddings:
    """Embeddings: one vector per input, all in the final frame, priced per input token."""

    name = "embeddings"

    async def execute(self, backend, body: EmbeddingsBody, cancel: asyncio.Event, out: Output) -> Outcome:
        embedded = await backend.embed(body, cancel)
        if embedded is None:
            return Outcome("cancelled")  # no vectors left the worker: nothing to bill
        n = embedded.tokens
        return Outcome("stop", units=Units(input_tokens=n), input_units=n, unit="tokens", first_output_at=time.time(),
                       result=encode(EmbeddingsResult(embedded.vectors)))


class Transcription:
    """Speech to text (and translation to English): the text and its timings in the final frame, priced per
    started second of audio."""

    name = "transcription"

    async def execute(self, backend, body: TranscriptionBody, cancel: asyncio.Event, out: Output) -> Outcome:
        heard = await backend.transcribe(body, cancel)
        if heard is None:
            return Outcome("cancelled")  # no text left the worker: nothing to bill
        return Outcome("stop", units=Units(audio_seconds=heard.duration), input_units=math.ceil(heard.duration),
                       unit="seconds", first_output_at=time.time(), result=encode(heard))


class Images:
    """Images drawn (or edited) from a prompt: the PNGs in the final frame, priced per image of their size."""

    name = "images"

    async def execute(self, backend, body: ImagesBody, cancel: asyncio.Event, out: Output) -> Outcome:
        pngs = await backend.draw(body, cancel)
        if pngs is None:
            return Outcome("cancelled")  # no image left the worker: nothing to bill
        return Outcome("stop", units=Units(images={body.size: len(pngs)}), output_units=len(pngs), unit="images",
                       first_output_at=time.time(), result=encode(ImagesResult(pngs)))


# Encoded audio leaves in frames of at most this many bytes: far under any nats-server's max_payload.
_MAX_CHUNK_BYTES = 64 * 1024


class Speech:
    """Text to speech: audio encoded as the request asks and streamed in chunk frames as each piece is read,
    priced per character read."""

    name = "speech"

    async def execute(self, backend, body: SpeechBody, cancel: asyncio.Event, out: Output) -> Outcome:
        encoder = await asyncio.to_thread(AudioEncoder, body.response_format, backend.sample_rate)
        characters, first = 0, None
        try:
            async for piece in backend.speak(body, cancel):
                await _send(out, await asyncio.to_thread(encoder.encode, piece.pcm))
                characters += piece.characters
                first = first or time.time()
            if not cancel.is_set():
                await _send(out, await asyncio.to_thread(encoder.finish))
        finally:
            encoder.close()
        # Cut short, a request is billed the characters read before the cut.
        return Outcome("cancelled" if cancel.is_set() else "stop", units=Units(characters=characters),
                       input_units=characters, unit="characters", first_output_at=first)


async def _send(out: Output, data: bytes) -> None:
    """``data`` as chunk frames of at most ``_MAX_CHUNK_BYTES``, in order."""
    for start in range(0, len(data), _MAX_CHUNK_BYTES):
        await out.data(data[start:start + _MAX_CHUNK_BYTES])


KINDS: dict[str, Kind] = {kind.name: kind for kind in (Chat(), Completions(), Embeddings(), Transcription(), Images(),
                                                      Speech())}
