"""OpenAI-compatible upstreams' audio and image endpoints: transcriptions and translations, speech
streamed as the upstream makes it, and images drawn or edited. They are billed from our own price
table, as our own models of these kinds are: seconds of audio, characters read, images by size."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated, AsyncIterator

import aiohttp
import msgspec
from msgspec import Meta

from bus.errors import UpstreamFailed
from bus.protocol import (
    ImagesBody, Seconds, SpeechBody, TokenId, TranscribedSegment, TranscribedWord, TranscriptionBody,
    TranscriptionResult,
)
from bus.settings import ModelSpec
from consumers.backends.base import Spoken
from consumers.backends.providers.http import Forwarding, Upstream, decoder

Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Probability = Annotated[float, Meta(ge=0, le=1)]
# OpenAI's ``pcm`` speech: 16-bit little-endian mono at 24 kHz, which our encoder turns into the format asked.
SPEECH_SAMPLE_RATE = 24_000
# The voice an upstream is asked for when the model's ``voices`` map a request's voice to "" (OpenAI's first).
DEFAULT_VOICE = "alloy"
_PNG = b"\x89PNG\r\n\x1a\n"


class _Word(msgspec.Struct):
    word: str
    start: Seconds
    end: Seconds
    probability: Probability = 1.0  # OpenAI sends none; whisper servers (speaches, vLLM) do


class _Segment(msgspec.Struct):
    id: Count
    start: Seconds
    end: Seconds
    text: str
    seek: Count = 0
    tokens: list[TokenId] = []
    temperature: Probability = 0.0
    avg_logprob: Annotated[float, Meta(ge=-1e6, le=0)] = 0.0
    compression_ratio: Annotated[float, Meta(ge=0, le=1e6)] = 0.0
    no_speech_prob: Probability = 0.0


class _Heard(msgspec.Struct):
    """A ``verbose_json`` transcription; its ``duration`` is what the request is billed."""

    text: str
    duration: Seconds
    language: Annotated[str, Meta(max_length=16)] = ""
    segments: list[_Segment] = []
    words: list[_Word] = []


class _Image(msgspec.Struct):
    b64_json: str


class _Images(msgspec.Struct):
    data: Annotated[list[_Image], Meta(max_length=64)]


_heard = decoder(_Heard)
_images = decoder(_Images)


class OpenAIMedia(Forwarding):
    """A transcription, speech or images model behind an OpenAI-compatible API (one kind a model)."""

    sample_rate = SPEECH_SAMPLE_RATE

    def __init__(self, spec: ModelSpec, upstream: Upstream):
        self.kinds = frozenset({spec.kind})
        self._model = spec.upstream_model
        super().__init__(upstream)

    async def transcribe(self, body: TranscriptionBody, cancel: asyncio.Event) -> TranscriptionResult | None:
        """``body.audio`` transcribed (or translated) upstream, with its segments and, if asked, words."""
        def form() -> aiohttp.FormData:
            fields = aiohttp.FormData()
            # OpenAI tells the audio's format by the file name's extension alone.
            fields.add_field("file", body.audio, filename=f"audio.{_audio_extension(body.audio)}",
                             content_type="application/octet-stream")
            fields.add_field("model", self._model)
            fields.add_field("response_format", "verbose_json")
            if body.words:  # asking for words alone would drop the segments
                fields.add_field("timestamp_granularities[]", "segment")
                fields.add_field("timestamp_granularities[]", "word")
            if body.language and body.task == "transcribe":  # translations are to English
                fields.add_field("language", body.language)
            if body.prompt:
                fields.add_field("prompt", body.prompt)
            if body.temperature is not None:
                fields.add_field("temperature", str(body.temperature))
            return fields
        path = "/audio/translations" if body.task == "translate" else "/audio/transcriptions"
        heard = await self._up.post_json(path, form, _heard, cancel)
        if heard is None:
            return None
        segments = [TranscribedSegment(
            id=s.id, seek=s.seek, start=s.start, end=s.end, text=s.text, tokens=s.tokens, temperature=s.temperature,
            avg_logprob=s.avg_logprob, compression_ratio=s.compression_ratio, no_speech_prob=s.no_speech_prob,
        ) for s in heard.segments]
        words = [TranscribedWord(word=w.word, start=w.start, end=w.end, probability=w.probability)
                 for w in heard.words] if body.words else []
        language = "en" if body.task == "translate" else body.language or heard.language
        return TranscriptionResult(text=heard.text, language=language, duration=heard.duration, segments=segments,
                                   words=words)

    async def speak(self, body: SpeechBody, cancel: asyncio.Event) -> AsyncIterator[Spoken]:
        """``body.input`` read upstream, its PCM passed on as it arrives; the input's characters come with the
        first piece (the upstream reads, and bills, the whole input once it has begun)."""
        payload = {"model": self._model, "input": body.input, "voice": body.voice or DEFAULT_VOICE,
                   "response_format": "pcm", "speed": body.speed}
        characters, odd = len(body.input), b""
        async with self._up.chunks("/audio/speech", payload, cancel) as chunks:
            if chunks is None:
                return
            async for part in chunks:
                # A sample may be split between two reads: keep its first byte for the next one.
                pcm, odd = _whole_samples(odd + part)
                if pcm:
                    yield Spoken(pcm, characters)
                    characters = 0

    async def draw(self, body: ImagesBody, cancel: asyncio.Event) -> list[bytes] | None:
        """``body.n`` PNGs drawn upstream, or ``body.image`` edited there (where ``body.mask`` says)."""
        fields = {"model": self._model, "prompt": body.prompt, "n": body.n, "size": body.size,
                  "response_format": "b64_json"}
        if body.image is None:
            answer = await self._up.post_json("/images/generations", fields, _images, cancel)
        else:
            def form() -> aiohttp.FormData:
                edit = aiohttp.FormData()
                for name, value in fields.items():
                    edit.add_field(name, str(value))
                edit.add_field("image", body.image, filename=f"image.{_image_extension(body.image)}",
                               content_type=f"image/{_image_extension(body.image)}")
                if body.mask is not None:
                    edit.add_field("mask", body.mask, filename=f"mask.{_image_extension(body.mask)}",
                                   content_type=f"image/{_image_extension(body.mask)}")
                return edit
            answer = await self._up.post_json("/images/edits", form, _images, cancel)
        if answer is None:
            return None
        if len(answer.data) != body.n:
            raise UpstreamFailed(f"The upstream provider sent {len(answer.data)} images, not {body.n}.")
        return [_png(image.b64_json) for image in answer.data]


def _whole_samples(data: bytes) -> tuple[bytes, bytes]:
    """``data`` split into its whole 16-bit samples and the byte left over, if any."""
    cut = len(data) - len(data) % 2
    return data[:cut], data[cut:]


def _png(b64: str) -> bytes:
    """A base64 image from upstream, which must be a PNG (the format our images result holds)."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamFailed("The upstream provider sent an image that is not base64.") from None
    if not data.startswith(_PNG):
        raise UpstreamFailed("The upstream provider sent an image that is not a PNG.")
    return data


def _audio_extension(audio: bytes) -> str:
    """The file extension of audio the edge accepted, told by its first bytes (mp3 when nothing else matches)."""
    if audio[:4] == b"RIFF" and audio[8:12] == b"WAVE":
        return "wav"
    if audio[:4] == b"fLaC":
        return "flac"
    if audio[:4] == b"OggS":
        return "ogg"
    if audio[4:8] == b"ftyp":
        return "m4a"
    if audio[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    return "mp3"  # ID3-tagged or bare MPEG frames


def _image_extension(image: bytes) -> str:
    """The file extension of an image the edge accepted (PNG, JPEG or WebP), told by its first bytes."""
    if image.startswith(_PNG):
        return "png"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "jpeg"
