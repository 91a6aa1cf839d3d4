"""While billing is down the usage routes say the usage service is unavailable, not a model."""

from __future__ import annotations

import aiohttp

from tests.conftest import ADMIN_TOKEN


async def _get(stack, path: str, token: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.base_url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json()


async def test_usage_routes_name_the_usage_service_while_billing_is_down(stack, meter):
    await meter.stop()
    try:
        for path, token in (("/admin/usage", ADMIN_TOKEN), ("/v1/usage", stack.api_key)):
            status, body = await _get(stack, path, token)
            assert status == 503, body
            assert body["error"]["code"] == "usage_service_unavailable" and body["error"]["type"] == "server_error"
            assert "usage service" in body["error"]["message"]
    finally:
        await meter.start()
    status, body = await _get(stack, "/admin/usage", ADMIN_TOKEN)
    assert status == 200 and body["object"] == "list", "answered again once billing is back"
