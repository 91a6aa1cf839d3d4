"""What every backend provides to the worker runtime."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

from bus.protocol import ChatBody, ChatMessage, CompletionBody, EmbeddingsBody


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
