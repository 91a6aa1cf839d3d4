"""The edge's part of trace propagation: each request's ``traceparent`` (bus/tracing.py), continued
from the client's header or begun here, is current while the request is answered."""

from __future__ import annotations

from aiohttp import web

from bus import tracing


@web.middleware
async def trace_middleware(request: web.Request, handler):
    """Make the request's ``traceparent`` current: the envelope carries it, log lines name its trace id."""
    token = tracing.CURRENT.set(tracing.continued(request.headers.get(tracing.HEADER)))
    try:
        return await handler(request)
    finally:
        tracing.CURRENT.reset(token)
