"""GET /v1/usage (a tenant's own usage and cost) and GET /admin/usage (every tenant's)."""

from __future__ import annotations

import msgspec
import nats.errors
from aiohttp import web

from bus.errors import InvalidRequest, TollgateError, UsageServiceUnavailable
from bus.protocol import UsageAnswer, UsageQuery
from bus.subjects import USAGE_QUERY_SUBJECT
from edge.state import AUTH, PUBLISHER

_answer = msgspec.msgpack.Decoder(UsageAnswer).decode
MAX_LIMIT = 10_000  # rows in one answer


_PARAMS = frozenset({"start", "end", "limit", "group_by"})


def _query(request: web.Request, tenant: str | None, allowed: frozenset[str] = _PARAMS) -> UsageQuery:
    q = request.query
    unknown = sorted(set(q) - allowed)
    if unknown:  # a filter this API does not have must not look applied
        raise InvalidRequest(f"Unrecognized query parameter: {unknown[0]} (one of {', '.join(sorted(allowed))})",
                             param=unknown[0])
    bounds = {}
    for name in ("start", "end"):
        try:
            bounds[name] = float(q[name]) if name in q else None
        except ValueError:
            raise InvalidRequest(f"{name} is a time in unix seconds", param=name) from None
    try:
        limit = int(q.get("limit", 1000))
    except ValueError:
        raise InvalidRequest("limit is an integer", param="limit") from None
    if not 1 <= limit <= MAX_LIMIT:  # also keeps a 30-digit limit off the bus, which carries 64 bits
        raise InvalidRequest(f"limit must be from 1 to {MAX_LIMIT}", param="limit")
    group_by = [g for g in q.get("group_by", "").split(",") if g]
    return UsageQuery(tenant=tenant, group_by=group_by, limit=limit, **bounds)


async def _ask(request: web.Request, query: UsageQuery) -> web.Response:
    """Ask billing, which owns ClickHouse, over NATS request-reply."""
    nc = request.config_dict[PUBLISHER].nc
    try:
        reply = await nc.request(USAGE_QUERY_SUBJECT, msgspec.msgpack.encode(query), timeout=10)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        # No billing process is answering: say that, not that a model is unavailable.
        raise UsageServiceUnavailable("The usage service is unavailable right now. Try again shortly.") from None
    answer = _answer(reply.data)
    if answer.error is not None:
        raise TollgateError.from_info(answer.error)
    body = msgspec.json.encode({"object": "list", "data": answer.data})
    return web.Response(body=body, content_type="application/json")


routes = web.RouteTableDef()
# Mounted under /admin, behind the admin guard (edge.app).
admin_routes = web.RouteTableDef()


@routes.get("/v1/usage")
async def tenant_usage(request: web.Request) -> web.Response:
    principal = request.config_dict[AUTH].authenticate(request, "usage")
    return await _ask(request, _query(request, principal.tenant.id))  # never another tenant's


@admin_routes.get("/usage")
async def admin_usage(request: web.Request) -> web.Response:
    return await _ask(request, _query(request, request.query.get("tenant"), _PARAMS | {"tenant"}))
