"""Reading request bodies: a client that stops sending part-way is answered, not waited on forever."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from aiohttp import web

from bus.errors import RequestTimeout

# The edge's ``body_idle_s``, set by ``create_app`` (here, not in edge.state, which the error
# middleware that keeps to it cannot import).
BODY_IDLE_S = web.AppKey("body_idle_s", float)


@contextlib.asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[None]:
    """Run the block (a handler) while ``request``'s body is still arriving: if no byte of it comes for
    the edge's ``body_idle_s``, the block is cancelled and a 408 raised. A slow upload that keeps
    sending is never cut off; one that stalls (a Content-Length longer than what was sent) is.
    Once the whole body is in, the watch ends: what the handler does next takes as long as it takes."""
    content = request.content
    if content.is_eof():  # all of it came with the headers (most requests): nothing to watch
        yield
        return
    idle_s = request.config_dict[BODY_IDLE_S]
    loop = asyncio.get_running_loop()
    seen = content.total_bytes
    check: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(None) as scope:

            def look() -> None:
                nonlocal seen, check
                if content.is_eof():
                    return
                if content.total_bytes == seen:
                    scope.reschedule(loop.time())  # stalled: expire the scope now
                    return
                seen = content.total_bytes
                check = loop.call_later(idle_s, look)

            check = loop.call_later(idle_s, look)
            try:
                yield
            finally:
                check.cancel()
    except TimeoutError:
        if scope.expired():  # ours, not a timeout of the handler's own
            raise RequestTimeout(f"The request body stopped arriving: nothing came for {idle_s:g} s.") from None
        raise
