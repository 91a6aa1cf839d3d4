"""Kinds of work: how a backend runs a request's body, and what its result is billed as.

The runtime (``consumers.runtime``) is the same for every kind: verify, run,
stream, meter, ack. A kind adds only what differs: which backend method runs
its body, which frames carry its output, and the units its usage is priced in
(``bus.account.prices.Units``). A backend declares the kinds it serves in its
``kinds`` attribute; a new kind is one class here, registered in ``KINDS``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from bus.account.prices import Units
from bus.protocol import ChatBody, CompletionBody, EmbeddingsBody, EmbeddingsResult, encode
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


class Kind(Protocol):
    name: str

    async def execute(self, backend, body, cancel: asyncio.Event, out: Output) -> Outcome:
        """Run ``body`` on ``backend``, streaming to ``out`` what the client may see early; stop soon after ``cancel``."""
        ...


class Chat:
    """Chat completions: text streamed as it is generated, priced per prompt and completion token."""

    name = "chat"

    async def execute(self, backend, body: ChatBody, cancel: asyncio.Event, out: Output) -> Outcome:
        return await _generated(backend.chat(body, cancel), body.stream, out)


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
        units=Units(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens),
        input_units=result.prompt_tokens, output_units=result.completion_tokens, unit="tokens",
        first_output_at=first, text="".join(held),
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


KINDS: dict[str, Kind] = {kind.name: kind for kind in (Chat(), Completions(), Embeddings())}
