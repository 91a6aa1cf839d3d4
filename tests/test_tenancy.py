"""Tenants, keys and the admin API, on two edge processes sharing one NATS."""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp
import openai
import pytest

from tests.conftest import ADMIN_TOKEN, CHAT_INPUT_PRICE, CHAT_MODEL, CHAT_OUTPUT_PRICE, UNSERVED_MODEL, admin, fresh_minute, request_id, usage_rows

HI = [{"role": "user", "content": "Say hi."}]


async def _tenant(stack, tenant_id: str, **fields) -> str:
    """Create a tenant with ``fields`` and return a fresh key for it."""
    status, body = await admin(stack, "POST", "/admin/tenants", json={"id": tenant_id, **fields})
    assert status == 201, body
    status, body = await admin(stack, "POST", f"/admin/tenants/{tenant_id}/keys", json={"name": "test"})
    assert status == 201, body
    return body["key"]


async def test_admin_api_manages_tenants_and_keys(stack, meter):
    key = await _tenant(stack, "acme", tier="pro", name="Acme")
    status, body = await admin(stack, "POST", "/admin/tenants", json={"id": "acme"})
    assert status == 409 and body["error"]["code"] == "already_exists"
    status, body = await admin(stack, "POST", "/admin/tenants", json={"id": "x", "tier": "platinum"})
    assert status == 400 and body["error"]["param"] == "tier"
    status, body = await admin(stack, "POST", "/admin/tenants", json={"id": "bad id!"})
    assert status == 400 and body["error"]["param"] == "id"

    status, body = await admin(stack, "PATCH", "/admin/tenants/acme", json={"limits": {"rpm": 5}})
    assert status == 200 and body["limits"] == {"rpm": 5}
    status, body = await admin(stack, "GET", "/admin/tenants/nobody")
    assert status == 404

    status, body = await admin(stack, "GET", "/admin/keys?tenant=acme")
    assert status == 200 and len(body["data"]) == 1
    listed = body["data"][0]
    assert key.startswith("sk-tg-" + listed["id"])
    assert "hash" not in listed and "key" not in listed, "the secret is shown once, at creation"

    reply = await stack.client(api_key=key).chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None


async def test_admin_routes_refuse_tenant_keys_and_bad_tokens(stack, meter):
    status, body = await admin(stack, "GET", "/admin/tenants", token=stack.api_key)
    assert status == 403 and body["error"]["code"] == "admin_only"
    status, body = await admin(stack, "GET", "/admin/tenants", token="tga-wrong")
    assert status == 401
    status, _ = await admin(stack, "GET", "/admin/tenants", token=ADMIN_TOKEN)
    assert status == 200


async def test_revocation_reaches_every_edge_within_a_second(stack, second_edge, meter):
    key = await _tenant(stack, "revokee")
    on_second = stack.client(api_key=key, base_url=second_edge)
    await on_second.models.list()
    key_id = key.removeprefix("sk-tg-")[:12]
    status, body = await admin(stack, "DELETE", f"/admin/keys/{key_id}")  # revoked through the first edge
    assert status == 200 and body["revoked"] is True
    revoked_at = time.monotonic()
    while True:
        try:
            await on_second.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 1.0, "still accepted on the other edge after 1 s"
        await asyncio.sleep(0.02)


async def test_expired_key_is_rejected(stack, meter):
    await _tenant(stack, "shortlived")
    status, body = await admin(stack, "POST", "/admin/tenants/shortlived/keys", json={"expires_in": 1})
    client = stack.client(api_key=body["key"])
    await client.models.list()
    await asyncio.sleep(1.1)
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()


async def test_key_scopes_limit_endpoints_and_models(stack, meter):
    await _tenant(stack, "scoped")
    _, body = await admin(stack, "POST", "/admin/tenants/scoped/keys", json={"endpoints": ["models"]})
    models_only = stack.client(api_key=body["key"])
    await models_only.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        await models_only.chat.completions.create(model=CHAT_MODEL, messages=HI)

    _, body = await admin(stack, "POST", "/admin/tenants/scoped/keys", json={"models": [UNSERVED_MODEL]})
    one_model = stack.client(api_key=body["key"])
    assert [m.id for m in (await one_model.models.list()).data] == [UNSERVED_MODEL]
    with pytest.raises(openai.NotFoundError):
        await one_model.chat.completions.create(model=CHAT_MODEL, messages=HI)


async def test_usage_is_billed_to_the_keys_own_tenant(stack, meter, clickhouse):
    key = await _tenant(stack, "globex")
    reply = await stack.client(api_key=key).chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=2)
    [row] = await usage_rows(clickhouse, [request_id(reply.id)], expect=1)
    assert row["tenant"] == "globex"


async def test_service_tier_moves_lanes_only_where_allowed(stack, meter, clickhouse):
    big = stack.client(api_key=await _tenant(stack, "bigco", tier="enterprise"))
    small = stack.client(api_key=await _tenant(stack, "smallco", tier="free"))
    cases = [(big, None, "default", "high"), (big, "priority", "priority", "critical"), (big, "flex", "flex", "batch"),
             (small, "priority", "default", "normal"), (small, "flex", "flex", "batch")]
    multipliers = stack.settings.lane_multipliers
    for client, asked, reported, lane in cases:
        extra = {"service_tier": asked} if asked else {}
        reply = await client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=2, **extra)
        assert reply.service_tier == reported
        [row] = await usage_rows(clickhouse, [request_id(reply.id)], expect=1)
        assert row["lane"] == lane
        # Priced per token, then by the lane: priority dearer, flex cheaper.
        base = reply.usage.prompt_tokens * CHAT_INPUT_PRICE + reply.usage.completion_tokens * CHAT_OUTPUT_PRICE
        assert row["cost_micros"] == math.ceil(base * multipliers[lane])


async def test_two_edges_never_allow_more_than_the_tenant_limit(stack, second_edge, meter):
    key = await _tenant(stack, "limited", tier="pro", limits={"rpm": 60, "concurrency": 1000})
    edges = [stack.base_url, second_edge]
    body = {"model": CHAT_MODEL, "messages": HI, "max_tokens": 1}
    await fresh_minute()

    # aiohttp with one connection per request and a timeout: a burst of 100 is the edges' test,
    # not the client pool's.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=90)) as http:
        async def one(i: int):
            async with http.post(f"{edges[i % 2]}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
                return resp.status, resp.headers, await resp.json()

        results = await asyncio.gather(*(one(i) for i in range(100)))
    ok = [headers for status, headers, _ in results if status == 200]
    limited = [(headers, answer) for status, headers, answer in results if status == 429]
    assert len(ok) + len(limited) == 100, [status for status, _, _ in results]
    assert 50 <= len(ok) <= 60, f"{len(ok)} of 100 succeeded across two edges under a 60/min limit"
    assert all(int(h["x-ratelimit-limit-requests"]) == 60 for h in ok)
    assert all(a["error"]["code"] == "rate_limit_exceeded" and a["error"]["type"] == "requests" for _, a in limited)
    assert 0 < int(limited[0][0]["Retry-After"]) <= 60
    # A refusal says which limit refused it, as a success does.
    assert all(int(h["x-ratelimit-limit-requests"]) == 60 and h["x-ratelimit-reset-requests"] for h, _ in limited)


async def test_tokens_per_minute_are_estimated_then_corrected(stack, meter):
    client = stack.client(api_key=await _tenant(stack, "tokenlimited", limits={"tpm": 300}))
    await fresh_minute()
    # Admission charges the completion cap: two at once cannot both fit in 300.
    results = await asyncio.gather(
        *(client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=200) for _ in range(2)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], openai.RateLimitError) and errors[0].type == "tokens"
    # The finished one used far fewer than 200 tokens; the difference is given back (in batches, 5 a second).
    await asyncio.sleep(0.5)
    await client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=200)


async def test_concurrency_limit_holds_across_edges(stack, second_edge, meter):
    key = await _tenant(stack, "serial", limits={"concurrency": 1})
    first = await stack.client(api_key=key).chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=60, stream=True
    )
    with pytest.raises(openai.RateLimitError):
        await stack.client(api_key=key, base_url=second_edge).chat.completions.create(model=CHAT_MODEL, messages=HI)
    async for _ in first:
        pass
    await asyncio.sleep(0.3)  # the slot is released just after the response ends
    await stack.client(api_key=key, base_url=second_edge).chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=1)
