"""Text to speech with Piper: espeak-ng phonemes, then a VITS voice on onnxruntime.

A request's text is phonemized once and read piece by piece: each of Piper's sentences, and a
sentence longer than ``MAX_PIECE_PHONEMES`` cut at word boundaries. So the first audio comes
after one short inference, a cancel is heard between pieces, and memory stays bounded: one
4,096-character sentence read whole took 85 s and 5 GB here, while the time a piece takes grows
only linearly with its phonemes, so short pieces cost nothing (200 phonemes: about 10 s of speech,
half a second on an idle core pair). Every inference runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from piper import PiperVoice, SynthesisConfig

from bus.errors import InvalidRequest
from bus.protocol import SpeechBody
from consumers.backends.base import Spoken

MAX_PIECE_PHONEMES = 200
_WORD_BREAK = " "  # the phoneme espeak-ng puts between words


def _pieces(voice: PiperVoice, text: str) -> list[list[str]]:
    """``text``'s phonemes, one list per piece to synthesize: sentences, long ones cut between words."""
    pieces = []
    for sentence in voice.phonemize(text.replace("\0", " ")):  # espeak-ng takes C strings, which hold no NUL
        while len(sentence) > MAX_PIECE_PHONEMES:
            # At the last word break within the limit; a "word" longer than the limit is cut where it must be.
            cut = next((i for i in range(MAX_PIECE_PHONEMES, 0, -1) if sentence[i] == _WORD_BREAK), MAX_PIECE_PHONEMES)
            pieces.append(sentence[:cut])
            sentence = sentence[cut + (sentence[cut] == _WORD_BREAK):]  # the break itself is not read
        if sentence:
            pieces.append(sentence)
    return pieces


def _audio(voice: PiperVoice, phonemes: list[str], config: SynthesisConfig) -> bytes:
    """One piece's speech as 16-bit little-endian PCM, scaled to full range as Piper's ``synthesize`` does."""
    audio = voice.phoneme_ids_to_audio(voice.phonemes_to_ids(phonemes), config)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 1e-8:
        audio = audio / peak
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class PiperSpeech:
    """Piper voices loaded from one weights directory, all at one sample rate."""

    kinds = frozenset({"speech"})

    def __init__(self, path: str, voices: dict[str, str]):
        root = Path(path)
        names = set(voices.values())
        if not names:  # every voice name speaks the directory's one voice
            found = sorted(p.name.removesuffix(".onnx") for p in root.glob("*.onnx"))
            if len(found) != 1:
                raise ValueError(f"{path} holds {len(found)} voices ({', '.join(found)}): name them in `voices`")
            names, self._only = set(found), found[0]
        else:
            self._only = None
        for name in names:
            if not (root / f"{name}.onnx").is_file():
                raise ValueError(f"voice {name!r} is not in {path} (no {name}.onnx)")
        self._voices = {name: PiperVoice.load(root / f"{name}.onnx") for name in sorted(names)}
        rates = {voice.config.sample_rate for voice in self._voices.values()}
        if len(rates) != 1:
            raise ValueError(f"the voices in {path} have different sample rates {sorted(rates)}: "
                             "serve them as separate models")
        self.sample_rate = rates.pop()

    async def speak(self, body: SpeechBody, cancel: asyncio.Event) -> AsyncIterator[Spoken]:
        """Yield ``body.input`` read aloud, piece by piece; stop once ``cancel`` is set, dropping the piece being read.

        A piece is billed the share of the input's characters that its phonemes are of all of them.
        """
        voice = self._voices.get(body.voice or self._only)
        if voice is None:
            raise InvalidRequest(f"This model has no voice {body.voice!r}.", param="voice")
        pieces = await asyncio.to_thread(_pieces, voice, body.input)
        if not pieces:
            raise InvalidRequest("input has nothing to read aloud.", param="input")
        config = SynthesisConfig(length_scale=voice.config.length_scale / body.speed)
        total, read, billed = sum(map(len, pieces)), 0, 0
        for phonemes in pieces:
            if cancel.is_set():
                return
            pcm = await asyncio.to_thread(_audio, voice, phonemes, config)
            if cancel.is_set():
                return  # nobody is left to hear it: neither sent nor billed
            read += len(phonemes)
            characters = -(-len(body.input) * read // total)  # rounded up; the last piece ends at the whole input
            yield Spoken(pcm, characters - billed)
            billed = characters
