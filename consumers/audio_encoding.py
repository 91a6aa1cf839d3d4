"""Streaming audio encoding with PyAV: 16-bit mono PCM in as it is made, container bytes out as soon as they are muxed.

Each of OpenAI's speech formats is one PyAV container and codec. The muxer writes into a sink
that cannot seek, so those that would go back to patch a header write streaming ones instead
(WAV's sizes are 0xFFFFFFFF, "until the end"; MP3 gets no Xing frame; FLAC's total length is
"unknown"), and ``flush_packets`` hands over every packet as it is muxed rather than when a
32 KiB buffer fills. The codec resamples where its format needs another rate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


@dataclass(frozen=True)
class _Format:
    container: str
    codec: str
    rate: int | None = None  # None: the voice's own rate
    bit_rate: int | None = None


_FORMATS: dict[str, _Format] = {
    "mp3": _Format("mp3", "libmp3lame", bit_rate=64_000),
    # Opus takes 8, 12, 16, 24 or 48 kHz only.
    "opus": _Format("ogg", "libopus", rate=24_000, bit_rate=32_000),
    "aac": _Format("adts", "aac", bit_rate=64_000),
    "flac": _Format("flac", "flac"),
    "wav": _Format("wav", "pcm_s16le"),
    # Headerless, so the rate is part of the format: OpenAI's pcm is 24 kHz, and clients written for
    # it would play another rate at the wrong pitch.
    "pcm": _Format("s16le", "pcm_s16le", rate=24_000),
}


class _Sink:
    """A write-only file for the muxer: what it writes, until taken."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class AudioEncoder:
    """One response's encoder: ``encode`` each piece of PCM as it comes, then ``finish``; ``close`` in any case.

    Its calls block (they run the codec), so callers on an event loop run them in a thread, one at a time.
    """

    def __init__(self, response_format: str, sample_rate: int):
        spec = _FORMATS[response_format]
        self._sink = _Sink()
        # bitexact: no encoder-version tags, so the same audio encodes to the same bytes.
        self._container = av.open(self._sink, mode="w", format=spec.container,
                                  container_options={"flush_packets": "1", "fflags": "+bitexact"})
        self._stream = self._container.add_stream(spec.codec, rate=spec.rate or sample_rate, layout="mono")
        if spec.bit_rate:
            self._stream.bit_rate = spec.bit_rate
        self._rate, self._samples = sample_rate, 0

    def encode(self, pcm: bytes) -> bytes:
        """The container bytes ready after ``pcm`` (16-bit little-endian mono at the voice's rate)."""
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate, frame.time_base, frame.pts = self._rate, Fraction(1, self._rate), self._samples
            self._samples += samples.shape[1]
            self._container.mux(self._stream.encode(frame))
        return self._sink.take()

    def finish(self) -> bytes:
        """The rest: what the codec still holds, and the container's trailer."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._sink.take()

    def close(self) -> None:
        """Free the codec and container (after ``finish``, or instead of it when the response was cut short)."""
        with contextlib.suppress(Exception):  # already closed by finish, or half-written: nothing to keep
            self._container.close()
