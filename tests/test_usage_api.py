"""Usage and cost through the API: a tenant sees its own, the admin sees everyone's, rollups match raw."""

from __future__ import annotations

import aiohttp

from tests.conftest import CHAT_MODEL, admin, request_id, usage_rows

HI = [{"role": "user", "content": "Say hi."}]


async def _get(stack, path: str, token: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.base_url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json()


async def _tenant_key(stack, tenant_id: str) -> str:
    await admin(stack, "POST", "/admin/tenants", json={"id": tenant_id, "tier": "pro"})
    _, body = await admin(stack, "POST", f"/admin/tenants/{tenant_id}/keys", json={})
    return body["key"]


async def test_tenants_see_their_own_usage_and_admins_see_all(stack, meter, clickhouse):
    keys = {t: await _tenant_key(stack, t) for t in ("umbrella", "initech")}
    replies = {}
    for tenant, n in (("umbrella", 2), ("initech", 1)):
        client = stack.client(api_key=keys[tenant])
        replies[tenant] = [await client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=3)
                           for _ in range(n)]
    ids = [request_id(r.id) for rs in replies.values() for r in rs]
    await usage_rows(clickhouse, ids, expect=3)

    status, body = await _get(stack, "/v1/usage?group_by=tenant,model", keys["umbrella"])
    assert status == 200
    assert [row["group"] for row in body["data"]] == [{"tenant": "umbrella", "model": CHAT_MODEL}]
    [mine] = body["data"]
    assert mine["requests"] == 2
    assert mine["output_units"] == sum(r.usage.completion_tokens for r in replies["umbrella"])
    assert mine["input_units"] == sum(r.usage.prompt_tokens for r in replies["umbrella"])

    status, body = await _get(stack, "/admin/usage?group_by=tenant", "tga-test-admin")
    by_tenant = {row["group"]["tenant"]: row["requests"] for row in body["data"]}
    assert status == 200 and by_tenant["umbrella"] == 2 and by_tenant["initech"] == 1

    status, body = await _get(stack, "/admin/usage", keys["umbrella"])
    assert status == 403
    status, body = await _get(stack, "/v1/usage?group_by=color", keys["umbrella"])
    assert status == 400 and body["error"]["param"] == "group_by"
    # A filter the API does not have is refused, not ignored (its totals would look filtered).
    for bad in ("start=nan", "start=-1e12", "end=1e20", "end=inf", "start=abc", "limit=ten", "model=x", "tenant=y"):
        status, body = await _get(stack, f"/v1/usage?{bad}", keys["umbrella"])
        assert status == 400 and body["error"]["param"] == bad.split("=")[0], (bad, body)


async def test_rollups_agree_with_raw_rows(meter, clickhouse):
    # One statement, so no insert can land between the raw and the rolled-up read.
    totals = "tenant, {n}, sum(input_units), sum(output_units)"
    [(raw, minute, hour)] = await clickhouse.query(
        f"SELECT (SELECT groupArray(t) FROM (SELECT tuple({totals.format(n='count()')}) AS t FROM usage_events "
        "GROUP BY tenant ORDER BY tenant)), "
        + ", ".join(
            f"(SELECT groupArray(t) FROM (SELECT tuple({totals.format(n='sum(requests)')}) AS t FROM {table} "
            "GROUP BY tenant ORDER BY tenant))"
            for table in ("usage_minute", "usage_hour")
        )
    )
    assert len(raw) > 1
    assert minute == raw and hour == raw
