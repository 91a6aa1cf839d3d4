"""What every backend provides to the worker runtime."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from bus.protocol import ChatBody


@dataclass(frozen=True)
class ChatResult:
    """The last item a chat backend yields: why it stopped and the exact token counts."""

    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


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
