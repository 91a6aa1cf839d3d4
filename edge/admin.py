"""The admin API for tenants and API keys (mounted under ``/admin``, admin token only)."""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
from aiohttp import web

from bus.errors import InvalidRequest
from bus.account.tenants import LATEST_EXPIRY, ApiKey, Limits, Tenant
from bus.account.tenant_store import TenancyStore
from bus.openai.decoding import decode_json as decode_body
from edge.state import TENANCY


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    expires_at: Annotated[float, msgspec.Meta(gt=0, le=LATEST_EXPIRY)] | None = None  # unix seconds
    expires_in: Annotated[float, msgspec.Meta(gt=0, le=100 * 365 * 86_400)] | None = None  # seconds from now
    models: list[str] | None = None
    endpoints: list[str] | None = None
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}


# Mounted under /admin, behind the admin guard (edge.app).
admin_routes = web.RouteTableDef()


def json_response(data, status: int = 200) -> web.Response:
    """A JSON response from any msgspec-encodable value."""
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def key_view(key: ApiKey) -> dict:
    """A key as the admin API shows it: everything but the hash."""
    view = msgspec.to_builtins(key)
    view.pop("hash")
    return view


def _store(request: web.Request) -> TenancyStore:
    return request.config_dict[TENANCY]


async def _patch(request: web.Request) -> dict:
    patch = decode_body(await request.read(), dict)
    if not patch:
        raise InvalidRequest("nothing to change")
    return patch


@admin_routes.post("/tenants")
async def create_tenant(request: web.Request) -> web.Response:
    store = _store(request)
    tenant = await store.create_tenant(decode_body(await request.read(), Tenant))
    return json_response(tenant, 201)


@admin_routes.get("/tenants")
async def list_tenants(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": await _store(request).list_tenants()})


@admin_routes.get("/tenants/{tenant}")
async def get_tenant(request: web.Request) -> web.Response:
    return json_response(await _store(request).get_tenant(request.match_info["tenant"]))


@admin_routes.patch("/tenants/{tenant}")
async def update_tenant(request: web.Request) -> web.Response:
    store = _store(request)
    return json_response(await store.update_tenant(request.match_info["tenant"], await _patch(request)))


@admin_routes.post("/tenants/{tenant}/keys")
async def create_key(request: web.Request) -> web.Response:
    store = _store(request)
    spec = decode_body(await request.read() or b"{}", KeyCreate)
    if spec.expires_at is not None and spec.expires_in is not None:
        raise InvalidRequest("set expires_at or expires_in, not both", param="expires_in")
    now = time.time()
    if spec.expires_at is not None and spec.expires_at <= now:
        raise InvalidRequest("expires_at is in the past: the key would never work", param="expires_at")
    expires = spec.expires_at if spec.expires_in is None else now + spec.expires_in
    key, secret = await store.create_key(
        request.match_info["tenant"], name=spec.name, expires=expires, models=spec.models,
        endpoints=spec.endpoints, limits=spec.limits, model_limits=spec.model_limits,
    )
    return json_response({"key": secret, **key_view(key)}, 201)


@admin_routes.get("/keys")
async def list_keys(request: web.Request) -> web.Response:
    keys = await _store(request).list_keys(request.query.get("tenant"))
    return json_response({"object": "list", "data": [key_view(k) for k in keys]})


@admin_routes.get("/keys/{key}")
async def get_key(request: web.Request) -> web.Response:
    return json_response(key_view(await _store(request).get_key(request.match_info["key"])))


@admin_routes.patch("/keys/{key}")
async def update_key(request: web.Request) -> web.Response:
    store = _store(request)
    return json_response(key_view(await store.update_key(request.match_info["key"], await _patch(request))))


@admin_routes.delete("/keys/{key}")
async def revoke_key(request: web.Request) -> web.Response:
    return json_response(key_view(await _store(request).revoke_key(request.match_info["key"])))
