"""Reading request bodies: a client that stops sending part-way is answered, not waited on forever."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from aiohttp import web

from bus.errors import RequestTimeout

# The edge's ``body_idle_s``, set by ``create_app`` (here, not in edge.state, which the error
# middleware that reads bodies cannot import).
BODY_IDLE_S = web.AppKey("body_idle_s", float)


@contextlib.asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[None]:
    """Bound the reads of ``request``'s body inside the block: if no byte of it arrives for the
    edge's ``body_idle_s``, the block is cancelled and a 408 raised. A slow upload that keeps
    sending is never cut off; one that stalls (say a Content-Length longer than what was sent) is."""
    if request.content.is_eof():  # all of it arrived with the headers: nothing to wait for
        yield
        return
    idle_s = request.config_dict[BODY_IDLE_S]
    loop = asyncio.get_running_loop()
    content = request.content
    seen = content.total_bytes
    check: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(None) as scope:

            def progressed() -> None:
                nonlocal seen, check
                if content.total_bytes == seen and not content.is_eof():
                    scope.reschedule(loop.time())  # stalled: expire the scope now
                    return
                seen = content.total_bytes
                check = loop.call_later(idle_s, progressed)

            check = loop.call_later(idle_s, progressed)
            yield
    except TimeoutError:
        raise RequestTimeout(f"The request body stopped arriving: nothing came for {idle_s:g} s.") from None
    finally:
        if check is not None:
            check.cancel()


async def read_body(request: web.Request) -> bytes:
    """The whole body, read within ``body_deadline``; handlers' later ``request.read()`` gets it at once."""
    async with body_deadline(request):
        return await request.read()
