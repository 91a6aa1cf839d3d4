"""OpenAI audio endpoints on the wire: transcriptions and translations (speech to text), speech (text to speech)."""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from bus.account.prices import Charge, Units
from bus.errors import InvalidRequest
from bus.protocol import (MAX_SPEECH_CHARACTERS, SpeechBody, SpeechFormat, TranscriptionBody,
                          TranscriptionResult)
from bus.settings import ModelSpec

# -- speech to text: POST /v1/audio/transcriptions and /v1/audio/translations ------------------

# Longer audio is refused before admission: a worker holds an hour as 230 MB of 16 kHz samples.
MAX_AUDIO_SECONDS = 3600.0
# The languages whisper knows, by the codes requests give and the names verbose_json answers with.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}

TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Temperature = Annotated[float, Meta(ge=0, le=1)]


class TranslationRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The text fields of a translations form (the audio is its ``file`` part)."""

    model: str
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: Temperature = 0.0


class TranscriptionRequest(TranslationRequest, forbid_unknown_fields=True):
    """The text fields of a transcriptions form: a translation's, and the audio's language and timings asked."""

    language: str | None = None
    timestamp_granularities: list[Literal["word", "segment"]] = []


def to_transcription(req: TranslationRequest, spec: ModelSpec, audio: bytes) -> TranscriptionBody:
    """The bus form of a transcriptions (or, for a ``TranslationRequest``, translations) request for
    ``spec``; 400s name the field."""
    if spec.kind != "transcription":
        raise InvalidRequest(f"The model '{req.model}' does not transcribe audio; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    if not isinstance(req, TranscriptionRequest):
        return TranscriptionBody(audio=audio, task="translate", prompt=req.prompt, temperature=req.temperature)
    if req.language is not None and req.language not in LANGUAGES:
        raise InvalidRequest(f"language {req.language!r} is not an ISO-639-1 code whisper knows.", param="language")
    if req.timestamp_granularities and req.response_format != "verbose_json":
        raise InvalidRequest("timestamp_granularities needs response_format verbose_json.",
                             param="timestamp_granularities")
    return TranscriptionBody(audio=audio, language=req.language, prompt=req.prompt, temperature=req.temperature,
                             words="word" in req.timestamp_granularities)


def transcription_charge(seconds: float) -> Charge:
    """Admission's charge for ``seconds`` of audio: what it is billed for, known before it runs. An audio
    second counts as a token against per-minute limits. The worker's resampled copy may be a few samples
    longer, so the hold has a millisecond to spare."""
    return Charge(tokens=math.ceil(seconds), max_units=Units(audio_seconds=seconds + 0.001))


class DurationUsage(msgspec.Struct):
    seconds: int  # started seconds: what is billed
    type: str = "duration"


class Transcript(msgspec.Struct):
    text: str
    usage: DurationUsage


class Word(msgspec.Struct):
    word: str
    start: float
    end: float


class Segment(msgspec.Struct):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class VerboseTranscript(msgspec.Struct, omit_defaults=True):
    task: str
    language: str
    duration: float
    text: str
    segments: list[Segment]
    usage: DurationUsage
    words: list[Word] | None = None  # only when asked for


_result_decoder = msgspec.msgpack.Decoder(TranscriptionResult)
_json = msgspec.json.Encoder().encode


def transcript(result: bytes, seconds: int, response_format: str, body: TranscriptionBody) -> tuple[bytes, str]:
    """The answer's bytes and content type for an encoded ``TranscriptionResult`` billed as ``seconds``."""
    heard = _result_decoder.decode(result)
    if response_format == "text":
        return heard.text.encode() + b"\n", "text/plain; charset=utf-8"
    if response_format in ("srt", "vtt"):
        return _subtitles(heard, response_format).encode(), "text/plain; charset=utf-8"
    usage = DurationUsage(seconds)
    if response_format == "json":
        return _json(Transcript(heard.text, usage)), "application/json"
    language = "en" if body.task == "translate" else heard.language  # a translation's text is English
    # Numbered from 0 in order, as OpenAI's are (faster-whisper counts from 1).
    segments = [Segment(i, s.seek, s.start, s.end, s.text, s.tokens, s.temperature, s.avg_logprob,
                        s.compression_ratio, s.no_speech_prob) for i, s in enumerate(heard.segments)]
    words = [Word(w.word.strip(), w.start, w.end) for w in heard.words] if body.words else None
    verbose = VerboseTranscript(body.task, LANGUAGES.get(language, language), heard.duration, heard.text, segments,
                                usage, words)
    return _json(verbose), "application/json"


def _subtitles(heard: TranscriptionResult, form: str) -> str:
    """SubRip (numbered cues, ``00:00:01,500``) or WebVTT (a header, ``00:00:01.500``), a cue per segment."""
    mark = "," if form == "srt" else "."
    cues = [f"{_clock(s.start, mark)} --> {_clock(s.end, mark)}\n{s.text.strip()}\n" for s in heard.segments]
    if form == "srt":
        return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))
    return "WEBVTT\n\n" + "\n".join(cues)


def _clock(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


# -- text to speech: POST /v1/audio/speech -----------------------------------------------------

# OpenAI's voice names: on a model that configures no ``voices``, each speaks the model's one voice
# (a provider model's upstream has them all: each is sent as it is named).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
# What each format is answered as. pcm is 16-bit little-endian mono at 24 kHz, as OpenAI's is.
SPEECH_CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "aac": "audio/aac",
                        "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}


class VoiceId(msgspec.Struct, forbid_unknown_fields=True):
    """A voice given as an object, as the SDK allows: ``{"id": "..."}``."""

    id: Annotated[str, Meta(max_length=256)]


class SpeechRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    input: Annotated[str, Meta(min_length=1, max_length=MAX_SPEECH_CHARACTERS)]
    voice: Union[Annotated[str, Meta(max_length=256)], VoiceId]
    response_format: SpeechFormat = "mp3"
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] = 1.0
    # Piper reads the text as written and cannot be told how to say it: instructions are refused, not ignored.
    instructions: str | None = None
    # The audio itself, streamed as it is made; OpenAI's server-sent events of base64 audio are not offered.
    stream_format: Literal["audio"] = "audio"


def to_speech(req: SpeechRequest, spec: ModelSpec) -> SpeechBody:
    """The bus form of a speech request for ``spec``, its voice name made the model's voice; 400s name the field."""
    if spec.kind != "speech":
        raise InvalidRequest(f"The model '{req.model}' does not make speech; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    if not req.input.strip():
        raise InvalidRequest("input is blank: there is nothing to read aloud.", param="input")
    if req.instructions:
        raise InvalidRequest(f"The model '{req.model}' reads the input as written and cannot follow instructions.",
                             param="instructions")
    name = req.voice if isinstance(req.voice, str) else req.voice.id
    voices = spec.voices or {voice: voice if spec.provider else "" for voice in OPENAI_VOICES}
    if name not in voices:
        raise InvalidRequest(f"voice {name!r} is not offered by '{req.model}' (offered: {', '.join(voices)}).",
                             param="voice")
    return SpeechBody(input=req.input, voice=voices[name], response_format=req.response_format, speed=req.speed)


def speech_charge(body: SpeechBody) -> Charge:
    """Admission's charge: every character of the input, which is what a whole reading is billed. A
    character counts as a token against per-minute limits."""
    return Charge(tokens=len(body.input), max_units=Units(characters=len(body.input)))
