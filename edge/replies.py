"""What every generating route does once a request is admitted: publish it, answer it whole or as
server-sent events, and give back what admission took when it ends."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import msgspec
import nats.errors
from aiohttp import web

from bus.errors import NoCapacity, TollgateError
from bus.protocol import Final, RequestBody
from bus.publisher import Call, Publisher
from edge.admission import Admitted, Gate
from edge.errors import error_event
from edge import metrics

_encode = msgspec.json.Encoder().encode
REQUEST_ID_HEADER = "x-request-id"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Results(Protocol):
    """An endpoint's OpenAI objects for one request (``bus.openai.chat.ChatResults``, ``…completions``)."""

    model: str  # the model named in them: set to the one that served the request once it is known

    def completion(self, text: str, final: Final) -> msgspec.Struct:
        """The whole answer."""
        ...

    def opening(self) -> list[msgspec.Struct]:
        """The chunks that open a stream, before any text."""
        ...

    def delta(self, text: str) -> msgspec.Struct:
        """The chunk carrying one piece of text."""
        ...

    def closing(self, final: Final) -> list[msgspec.Struct]:
        """The chunks after the last text (finish reason, usage)."""
        ...


@contextlib.asynccontextmanager
async def published(publisher: Publisher, gate: Gate, admitted: Admitted, *, kind: str,
                    body: RequestBody) -> AsyncIterator[Call]:
    """Publish an admitted request and yield its call; however it ends, release what admission took."""
    call: Call | None = None
    queued = True  # unknown counts as queued: then billing settles or sweeps the hold, never twice
    try:
        async with publisher.submit(
            tenant=admitted.tenant, principal=admitted.principal, model=admitted.model, lane=admitted.lane, kind=kind,
            body=body, request_id=admitted.request_id, hold_micros=admitted.hold,
        ) as call:
            yield call
    except TollgateError as exc:
        if call is not None:
            exc.request_id = call.envelope.id  # the error response names the request, as a success would
        else:
            queued = not isinstance(exc, NoCapacity)  # no worker left, or the lane full
        raise
    except nats.errors.MaxPayloadError:
        queued = False  # never sent: edge.errors answers it 413
        raise
    finally:
        used = call.final.usage if call and call.final else None
        # A request refused before it was queued (no worker left, lane full) gets its tokens and
        # hold back at once. One that ran without a final frame (its client left mid-stream, say)
        # keeps its token estimate charged: refunding it would let a client that disconnects just
        # before the end read past its tokens-per-minute limit.
        if used is not None:
            used_tokens = used.prompt_tokens + used.completion_tokens
        else:
            used_tokens = None if queued else 0
        release = gate.release(admitted, published=queued, used_tokens=used_tokens)
        await asyncio.shield(release)


@dataclass(frozen=True)
class Events:
    """How a stream's chunks, its end and an error after it began are written as server-sent events."""

    chunk: Callable[[msgspec.Struct], bytes]
    done: bytes
    error: Callable[[TollgateError], bytes]


def _event(chunk: msgspec.Struct) -> bytes:
    return b"data: " + _encode(chunk) + b"\n\n"


OPENAI_EVENTS = Events(_event, b"data: [DONE]\n\n", error_event)


async def answer(request: web.Request, call: Call, results: Results, *, stream: bool,
                 headers: dict[str, str], events: Events = OPENAI_EVENTS) -> web.StreamResponse:
    """The call's frames as one JSON answer, or as server-sent events (OpenAI's unless ``events``) when ``stream``."""
    headers = {**headers, REQUEST_ID_HEADER: call.envelope.id}
    if not stream:
        text = []
        async for frame in call.frames():
            if not text:
                metrics.first_output(request, call.envelope.model)
            text.append(frame.text)
        results.model = call.envelope.model  # who served it: a route's target is known once it answers
        body = _encode(results.completion("".join(text), call.final))
        return web.Response(body=body, content_type="application/json", headers=headers)
    response: web.StreamResponse | None = None
    try:
        async for frame in call.frames():
            if response is None:
                # Headers go out with the first output, so an early failure keeps its real status.
                response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
                results.model = call.envelope.model  # the target serving a route, now that it is settled
                metrics.first_output(request, call.envelope.model)
                await response.prepare(request)
                for chunk in results.opening():
                    await response.write(events.chunk(chunk))
            if frame.text:
                await response.write(events.chunk(results.delta(frame.text)))
        for chunk in results.closing(call.final):
            await response.write(events.chunk(chunk))
        if events.done:
            await response.write(events.done)
    except TollgateError as exc:
        if response is None:
            raise
        await response.write(events.error(exc))
    await response.write_eof()
    return response
