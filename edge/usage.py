"""GET /v1/usage (a tenant's own usage and cost) and GET /admin/usage (every tenant's)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from bus.errors import InvalidRequest, TollgateError
from bus.protocol import UsageAnswer, UsageQuery
from bus.subjects import USAGE_QUERY_SUBJECT

_answer = msgspec.msgpack.Decoder(UsageAnswer).decode


def _query(request: web.Request, tenant: str | None) -> UsageQuery:
    q = request.query
    try:
        return UsageQuery(
            tenant=tenant,
            start=float(q["start"]) if "start" in q else None,
            end=float(q["end"]) if "end" in q else None,
            group_by=[g for g in q.get("group_by", "").split(",") if g],
            limit=int(q.get("limit", 1000)),
        )
    except ValueError:
        raise InvalidRequest("start and end are unix seconds; limit is an integer") from None


async def _ask(request: web.Request, query: UsageQuery) -> web.Response:
    """Ask billing, which owns ClickHouse, over NATS request-reply."""
    nc = request.app["publisher"].nc
    reply = await nc.request(USAGE_QUERY_SUBJECT, msgspec.msgpack.encode(query), timeout=10)
    answer = _answer(reply.data)
    if answer.error is not None:
        raise TollgateError.from_info(answer.error)
    body = msgspec.json.encode({"object": "list", "data": answer.data})
    return web.Response(body=body, content_type="application/json")


async def tenant_usage(request: web.Request) -> web.Response:
    principal = request.app["auth"].authenticate(request, "usage")
    return await _ask(request, _query(request, principal.tenant.id))  # never another tenant's


async def admin_usage(request: web.Request) -> web.Response:
    request.app["auth"].require_admin(request)
    return await _ask(request, _query(request, request.query.get("tenant")))
