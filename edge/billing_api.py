"""Credits and budgets over HTTP: the admin routes that change them, and a tenant's view of its own."""

from __future__ import annotations

import time
import msgspec
from aiohttp import web

from bus.account import credits
from bus.account.credits import CreditChange
from bus.account.budgets import Budget, BudgetStore, check
from bus.openai.decoding import decode_json as decode_body
from edge.admin import json_response
from edge.quota import QuotaGate


async def _credits_view(request: web.Request, tenant: str) -> web.Response:
    js = request.app["publisher"].js
    return json_response({"object": "credits", "tenant": tenant, "available_micros": await credits.available(js, tenant)})


async def tenant_credits(request: web.Request) -> web.Response:
    """GET /v1/credits: the caller's own available credits (balance less holds for requests in flight)."""
    principal = request.app["auth"].authenticate(request, "credits")
    return await _credits_view(request, principal.tenant.id)


async def get_credits(request: web.Request) -> web.Response:
    request.app["auth"].require_admin(request)
    tenant = await request.app["tenancy"].get_tenant(request.match_info["tenant"])
    return await _credits_view(request, tenant.id)


async def add_credits(request: web.Request) -> web.Response:
    """POST /admin/tenants/{tenant}/credits: record a grant, top-up or refund in the ledger.

    ``id`` is an idempotency key scoped to the tenant: the same change under it again is
    applied once (202, the first entry), a different change is a 409.
    """
    request.app["auth"].require_admin(request)
    tenant = (await request.app["tenancy"].get_tenant(request.match_info["tenant"])).id
    entry = decode_body(await request.read(), CreditChange).entry(tenant, time.time())
    # The tenant's id is claimed before anything is published: a reused id is a 409 now, not a
    # silent drop in billing later; a retry gets the first entry back.
    entry = await credits.record_change(request.app["publisher"].js, entry)
    # Accepted: billing applies the entry to the balance, normally within milliseconds.
    return json_response(entry, 202)


def budget_view(budget: Budget, state=None) -> dict:
    """A budget as the admin API shows it: its webhook secret is never sent back."""
    view = {"id": budget.id, **msgspec.to_builtins(budget), "state": state}
    view["webhook_secret"] = "set" if budget.webhook_secret else None
    return view


def _budgets(request: web.Request) -> BudgetStore:
    request.app["auth"].require_admin(request)
    return request.app["budgets"]


async def put_budget(request: web.Request) -> web.Response:
    """POST /admin/budgets: create a budget, or replace the one with the same tenant and name."""
    store = _budgets(request)
    allow = request.app["settings"].meter.webhook_allow  # the same file billing reads
    budget = check(decode_body(await request.read(), Budget), allow)
    await request.app["tenancy"].get_tenant(budget.tenant)
    return json_response(budget_view(await store.put(budget, allow)), 201)


async def list_budgets(request: web.Request) -> web.Response:
    """GET /admin/budgets[?tenant=]: budgets with what each has spent in its current period."""
    budgets = await _budgets(request).list(request.query.get("tenant"))
    gate: QuotaGate = request.app["quota"]
    data = [budget_view(b, gate.state(b.id)) for b in budgets]
    return json_response({"object": "list", "data": data})


async def delete_budget(request: web.Request) -> web.Response:
    await _budgets(request).delete(request.match_info["budget"])
    return json_response({"id": request.match_info["budget"], "deleted": True})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/credits", tenant_credits)
    router.add_get("/admin/tenants/{tenant}/credits", get_credits)
    router.add_post("/admin/tenants/{tenant}/credits", add_credits)
    router.add_post("/admin/budgets", put_budget)
    router.add_get("/admin/budgets", list_budgets)
    router.add_delete("/admin/budgets/{budget}", delete_budget)
