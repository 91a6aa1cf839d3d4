"""What every backend provides to the worker runtime."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

from bus.protocol import (ImagesBody, ChatBody, ChatMessage, CompletionBody, EmbeddingsBody, SpeechBody, TranscriptionBody,
                          TranscriptionResult)


@dataclass(frozen=True)
class ChatResult:
    """The last item a chat or completions backend yields: why it stopped and the exact token counts."""

    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    stop: str | None = None  # the stop sequence that ended the text, when one did
    cached_prompt_tokens: int = 0  # of prompt_tokens, those a provider's prompt cache served


@dataclass(frozen=True)
class Embedded:
    """An embeddings backend's answer: one little-endian float32 vector per input, in order, and the
    tokens the model read for them (special tokens included, after truncation)."""

    vectors: list[bytes]
    tokens: int


class Backend(Protocol):
    """A loaded model: the kinds of work it serves (``consumers.kinds``), each through its own method."""

    kinds: frozenset[str]


class ChatBackend(Backend, Protocol):
    """Runs chat requests for one loaded model."""

    def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        """Yield text pieces as they are produced, then exactly one ``ChatResult``.

        Must stop promptly once ``cancel`` is set, and must never block the event loop.
        """
        ...


class CompletionsBackend(Backend, Protocol):
    """Continues raw text prompts for one loaded model."""

    def complete(self, body: CompletionBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        """Like ``ChatBackend.chat`` for ``body.prompt`` as it is, no chat template; the prompt first with ``echo``."""
        ...


@runtime_checkable
class Tokenizing(Protocol):
    """A backend whose tokenizer answers tokenize and detokenize asks (``consumers.tokenize_service``)."""

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a completion of ``prompt`` starts from."""
        ...

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The ids a chat completion of ``messages`` starts from (the chat template applied)."""
        ...

    def text_of(self, ids: list[int]) -> str:
        """The text of ``ids``."""
        ...


class EmbeddingsBackend(Backend, Protocol):
    """Embeds texts or token-id lists for one loaded model."""

    async def embed(self, body: EmbeddingsBody, cancel: asyncio.Event) -> Embedded | None:
        """Embed ``body.inputs`` in order, or return None once ``cancel`` is set before they are done.

        Must never block the event loop.
        """
        ...


class TranscriptionBackend(Backend, Protocol):
    """Turns speech into text for one loaded model."""

    async def transcribe(self, body: TranscriptionBody, cancel: asyncio.Event) -> TranscriptionResult | None:
        """Transcribe (or translate) ``body.audio``, or return None once ``cancel`` is set before it is done.

        Must never block the event loop.
        """
        ...


@dataclass(frozen=True)
class Spoken:
    """A speech backend's piece of audio: 16-bit little-endian mono PCM at its ``sample_rate``, and the
    characters of the input it reads (the pieces' characters add up to the whole input's)."""

    pcm: bytes
    characters: int


class SpeechBackend(Backend, Protocol):
    """Reads text aloud for one loaded model."""

    sample_rate: int

    def speak(self, body: SpeechBody, cancel: asyncio.Event) -> AsyncIterator[Spoken]:
        """Yield ``body.input``'s audio in order, piece by piece as it is made; stop soon after ``cancel``.

        Must never block the event loop.
        """
        ...


class ImagesBackend(Backend, Protocol):
    """Draws images for one loaded diffusion model."""

    async def draw(self, body: ImagesBody, cancel: asyncio.Event) -> list[bytes] | None:
        """``body.n`` PNGs of ``body.width`` x ``body.height``, or None once ``cancel`` is set before they are done.

        Must never block the event loop.
        """
        ...
