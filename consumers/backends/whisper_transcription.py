"""Speech to text with faster-whisper: a whisper model in CTranslate2's layout, on CPU or GPU.

The audio is decoded (PyAV) and resampled to whisper's 16 kHz in a thread. faster-whisper
yields segments lazily; each is taken in a thread of its own, so a cancelled request stops
after the work in hand, and the event loop never waits on the model.

Audio that fits one 30 s window is decoded by ``WhisperModel.transcribe`` (whisper's own
loop, with its temperature fallback). Longer audio goes through faster-whisper's
``BatchedInferencePipeline``: cut at pauses (Silero VAD) into chunks of at most 30 s, decoded
``_CHUNKS_AT_ONCE`` chunks to a batch, with timestamps (so segments and words keep their times
on the original audio). That was 1.4x faster on a 98 s clip on the 2-core CPU (BENCHMARKS.md);
it decodes each chunk at the first temperature only and without the previous chunk's text.
The library batches the chunks of one audio, not several requests: concurrent requests run
side by side on CTranslate2's ``num_workers`` (the worker's ``concurrency``).
"""

from __future__ import annotations

import asyncio
import functools
import io

import av
import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.audio import decode_audio
from faster_whisper.transcribe import Segment

from bus.errors import InvalidRequest
from bus.protocol import TranscribedSegment, TranscribedWord, TranscriptionBody, TranscriptionResult

# Chunks of a long audio decoded together (faster-whisper's default): 4 minutes of speech a batch.
_CHUNKS_AT_ONCE = 8


class WhisperTranscription:
    """A loaded whisper model; ``concurrency`` requests may decode on it at once."""

    kinds = frozenset({"transcription"})

    def __init__(self, path: str, *, device: str, compute_type: str, concurrency: int):
        self.model = WhisperModel(path, device=device, compute_type=compute_type, num_workers=concurrency)
        self._rate = self.model.feature_extractor.sampling_rate
        self._window = self.model.feature_extractor.chunk_length * self._rate  # samples in one window

    async def transcribe(self, body: TranscriptionBody, cancel: asyncio.Event) -> TranscriptionResult | None:
        """The text of ``body.audio`` with its segments (and words if asked), or None once ``cancel`` is set."""
        if body.language is not None and body.language not in self.model.supported_languages:
            raise InvalidRequest(f"language {body.language!r} is not one this model knows.", param="language")
        audio = await asyncio.to_thread(self._decode, body.audio)
        # Temperature 0 (or none) is whisper's schedule, which starts at 0 and rises only for windows
        # whose text looks wrong, as OpenAI documents; any other value is used as it is.
        temperature = {} if not body.temperature else {"temperature": body.temperature}
        if len(audio) > self._window:
            # A pipeline per request: it keeps the word timing of the audio it decodes on itself.
            transcribe = functools.partial(BatchedInferencePipeline(self.model).transcribe,
                                           batch_size=_CHUNKS_AT_ONCE, without_timestamps=False)
        else:
            transcribe = self.model.transcribe
        # Language detection runs inside this call, before the first segment.
        segments, info = await asyncio.to_thread(
            transcribe, audio, task=body.task, language=body.language, initial_prompt=body.prompt,
            word_timestamps=body.words, **temperature)
        decoded: list[Segment] = []
        while not cancel.is_set():
            segment = await asyncio.to_thread(next, segments, None)
            if segment is None:
                break
            decoded.append(segment)
        if cancel.is_set():
            return None
        return TranscriptionResult(
            text="".join(s.text for s in decoded).strip(),
            language=info.language,
            duration=len(audio) / self._rate,
            segments=[_segment(s) for s in decoded],
            words=[TranscribedWord(w.word, float(w.start), float(w.end), float(w.probability))
                   for s in decoded for w in s.words or ()],
        )

    def _decode(self, data: bytes) -> np.ndarray:
        """Mono float32 samples at the model's rate; a file with no decodable audio is a 400 naming it."""
        try:
            audio = decode_audio(io.BytesIO(data), sampling_rate=self._rate)
        except (av.FFmpegError, ValueError, IndexError) as exc:  # IndexError: no audio stream
            raise InvalidRequest(f"The audio file could not be decoded: {exc}", param="file") from None
        if not len(audio):
            raise InvalidRequest("The audio file holds no audio.", param="file")
        return audio


def _segment(s: Segment) -> TranscribedSegment:
    """A faster-whisper segment as it crosses the bus (its numbers may be numpy's)."""
    return TranscribedSegment(
        id=s.id, seek=s.seek, start=float(s.start), end=float(s.end), text=s.text, tokens=list(s.tokens),
        temperature=float(s.temperature or 0.0), avg_logprob=float(s.avg_logprob),
        compression_ratio=float(s.compression_ratio), no_speech_prob=float(s.no_speech_prob))
