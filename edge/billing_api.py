"""Credits and budgets over HTTP: the admin routes that change them, and a tenant's view of its own."""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from bus.account import credits
from bus.account.credits import CreditChange
from bus.account.budgets import Budget, BudgetStore, check
from bus.errors import InvalidRequest
from bus.openai.decoding import decode_json as decode_body
from edge.admin import json_response
from edge.quota import QuotaGate
from edge.state import AUTH, BUDGETS, PUBLISHER, QUOTA, SETTINGS, TENANCY

routes = web.RouteTableDef()
# Mounted under /admin, behind the admin guard (edge.app).
admin_routes = web.RouteTableDef()


async def _credits_view(request: web.Request, tenant: str) -> web.Response:
    js = request.config_dict[PUBLISHER].js
    return json_response({"object": "credits", "tenant": tenant, "available_micros": await credits.available(js, tenant)})


@routes.get("/v1/credits")
async def tenant_credits(request: web.Request) -> web.Response:
    """GET /v1/credits: the caller's own available credits (balance less holds for requests in flight)."""
    principal = request.config_dict[AUTH].authenticate(request, "credits")
    return await _credits_view(request, principal.tenant.id)


@admin_routes.get("/tenants/{tenant}/credits")
async def get_credits(request: web.Request) -> web.Response:
    tenant = await request.config_dict[TENANCY].get_tenant(request.match_info["tenant"])
    return await _credits_view(request, tenant.id)


@admin_routes.post("/tenants/{tenant}/credits")
async def add_credits(request: web.Request) -> web.Response:
    """POST /admin/tenants/{tenant}/credits: record a grant, top-up or refund in the ledger.

    ``id`` is an idempotency key scoped to the tenant: the same change under it again is
    applied once (202, the first entry), a different change is a 409.
    """
    tenant = (await request.config_dict[TENANCY].get_tenant(request.match_info["tenant"])).id
    entry = decode_body(await request.read(), CreditChange).entry(tenant, time.time())
    # The tenant's id is claimed before anything is published: a reused id is a 409 now, not a
    # silent drop in billing later; a retry gets the first entry back.
    entry = await credits.record_change(request.config_dict[PUBLISHER].js, entry)
    # Accepted: billing applies the entry to the balance, normally within milliseconds.
    return json_response(entry, 202)


def budget_view(budget: Budget, state=None) -> dict:
    """A budget as the admin API shows it: its webhook secret is never sent back."""
    view = {"id": budget.id, **msgspec.to_builtins(budget), "state": state}
    view["webhook_secret"] = "set" if budget.webhook_secret else None
    return view


def _budgets(request: web.Request) -> BudgetStore:
    return request.config_dict[BUDGETS]


@admin_routes.post("/budgets")
async def put_budget(request: web.Request) -> web.Response:
    """POST /admin/budgets: create a budget, or replace the one with the same tenant and name."""
    store = _budgets(request)
    allow = request.config_dict[SETTINGS].meter.webhook_allow  # the same file billing reads
    budget = check(decode_body(await request.read(), Budget), allow)
    tenancy = request.config_dict[TENANCY]
    await tenancy.get_tenant(budget.tenant)
    if budget.key is not None and (await tenancy.get_key(budget.key)).tenant != budget.tenant:
        raise InvalidRequest(f"API key {budget.key!r} is not one of {budget.tenant!r}'s keys", param="key")
    return json_response(budget_view(await store.put(budget, allow)), 201)


@admin_routes.get("/budgets")
async def list_budgets(request: web.Request) -> web.Response:
    """GET /admin/budgets[?tenant=]: budgets with what each has spent in its current period."""
    budgets = await _budgets(request).list(request.query.get("tenant"))
    gate: QuotaGate = request.config_dict[QUOTA]
    data = [budget_view(b, gate.state(b.id)) for b in budgets]
    return json_response({"object": "list", "data": data})


@admin_routes.delete("/budgets/{budget}")
async def delete_budget(request: web.Request) -> web.Response:
    await _budgets(request).delete(request.match_info["budget"])
    return json_response({"id": request.match_info["budget"], "deleted": True})
