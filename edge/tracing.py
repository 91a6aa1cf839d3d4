"""The edge's part of tracing: each request's ``traceparent`` (bus/tracing.py), continued from the
client's header or begun here, is current while the request is answered; with spans on, it is
that of the request's server span, which the envelope then carries to the worker and billing."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bus import tracing
from bus.settings import Settings
from edge.metrics import route_pattern


_SPAN = web.RequestKey("tollgate_server_span", object)


@web.middleware
async def trace_middleware(request: web.Request, handler):
    """Make the request's ``traceparent`` current: the envelope carries it, log lines name its trace id.

    With spans on, the request is a server span named ``<method> <route pattern>``, child of the
    client's ``traceparent`` (a new trace without a valid one); a 5xx marks it failed."""
    header = request.headers.get(tracing.HEADER)
    if not tracing.enabled():
        token = tracing.CURRENT.set(tracing.continued(header))
        try:
            return await handler(request)
        finally:
            tracing.CURRENT.reset(token)
    route = route_pattern(request)
    with tracing.span(f"{request.method} {route}", parent=header or "", kind="server",
                      attributes={"http.request.method": request.method, "http.route": route}) as span:
        request[_SPAN] = span
        response = await handler(request)
        if not response.prepared:  # sent after its handler returns; a stream's status is set as it starts
            await response_status(request, response)
        return response


async def response_status(request: web.Request, response: web.StreamResponse) -> None:
    """Put the status a request is answered with on its server span (``on_response_prepare``: a stream's
    headers go out inside its handler, which a client leaving at the end may then cancel)."""
    span = request.get(_SPAN)
    if span is None or not span.is_recording():
        return
    span.set_attribute("http.response.status_code", response.status)
    if response.status >= 500:
        tracing.failed(span, f"HTTP {response.status}")


def exported(settings: Settings):
    """The edge's cleanup context for spans: exported while it runs, the last ones sent when it stops."""
    async def exporting(app: web.Application):
        tracing.install(settings.tracing, "edge")
        yield
        await asyncio.to_thread(tracing.uninstall)
    return exporting
