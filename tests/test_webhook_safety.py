"""Budget webhooks reach no internal address the operator has not allowed, and follow no redirect.

The test stack allowlists 127.0.0.1 only (tests/conftest.py); 127.0.0.2 is loopback too, and
refused, so a receiver listening there shows what a refused destination would have received.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiohttp import web

from bus.account.budgets import Budget
from bus.errors import Conflict
from bus.subjects import BUDGETS_BUCKET
from bus.account.tenants import Tenant
from tests.conftest import admin, eventually, free_port, publish_usage, usage_event


class Receiver:
    """A real HTTP server on ``host`` that records every request and answers with ``answer``."""

    def __init__(self, host: str, answer=None):
        self.host, self.port = host, free_port()
        self.calls: list[tuple[str, str]] = []
        self._answer = answer or (lambda request: web.Response(status=200))

    async def __aenter__(self) -> "Receiver":
        async def record(request: web.Request) -> web.StreamResponse:
            self.calls.append((request.method, request.path))
            return self._answer(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"


async def _tenant(stack, tenant_id: str) -> None:
    async def make(store):
        try:
            await store.create_tenant(Tenant(id=tenant_id, tier="enterprise"))
        except Conflict:  # made by an earlier case
            pass

    await stack.tenancy(make)


async def _budget(stack, tenant: str, name: str, url: str) -> tuple[int, dict]:
    return await admin(stack, "POST", "/admin/budgets", json={
        "tenant": tenant, "name": name, "amount_micros": 100, "thresholds": [100], "webhook_url": url})


@pytest.mark.parametrize("url", [
    "http://127.0.0.2:8080/hook", "http://[::1]/hook", "http://[::ffff:127.0.0.2]/hook", "http://10.1.2.3/hook",
    "http://192.168.0.10/hook", "http://169.254.169.254/latest/meta-data/", "http://100.100.100.200/",
    "http://0.0.0.0:8080/", "http://localhost:8080/hook", "http://LOCALHOST./hook", "http://api.localhost/",
    "http://metadata.google.internal/computeMetadata/v1/",
])
async def test_a_webhook_to_an_internal_address_is_refused_when_the_budget_is_set(stack, meter, url):
    await _tenant(stack, "hook-refused")
    status, body = await _budget(stack, "hook-refused", "internal", url)
    assert status == 400, body
    assert body["error"]["param"] == "webhook_url" and "webhook_allow" in body["error"]["message"]


async def test_allowlisted_and_public_destinations_are_accepted(stack, meter):
    await _tenant(stack, "hook-accepted")
    for name, url in (("allowed", "http://127.0.0.1:9/hook"), ("public", "https://hooks.example.com/t?secret=x")):
        status, body = await _budget(stack, "hook-accepted", name, url)
        assert status == 201, body


async def test_a_stored_webhook_to_a_refused_address_is_never_called(stack, nc, meter):
    """A budget stored before the policy (or written to KV directly) is checked again when sent."""
    await _tenant(stack, "hook-stored")
    async with Receiver("127.0.0.1") as allowed, Receiver("127.0.0.2") as refused:
        # The control: an allowed receiver of the same tenant's alerts, so the test knows they were sent.
        assert (await _budget(stack, "hook-stored", "control", allowed.url()))[0] == 201
        kv = await nc.jetstream().key_value(BUDGETS_BUCKET)
        old = Budget(tenant="hook-stored", name="old", amount_micros=100, thresholds=[100],
                     webhook_url=refused.url())
        await kv.put(old.id, msgspec.msgpack.encode(old))
        await publish_usage(nc.jetstream(), [usage_event(tenant="hook-stored", cost_micros=150)])

        async def control_called():
            return allowed.calls

        await eventually(control_called, timeout=15)
        await asyncio.sleep(1.0)  # several retry delays (0.2 s, doubling): a retry would have come by now
    assert refused.calls == []


async def test_a_redirect_is_not_followed(stack, nc, meter):
    await _tenant(stack, "hook-redirect")
    async with Receiver("127.0.0.1") as target:
        def redirect(request):
            return web.Response(status=302, headers={"Location": target.url("/stolen")})

        async with Receiver("127.0.0.1", redirect) as hook:
            assert (await _budget(stack, "hook-redirect", "alerts", hook.url()))[0] == 201
            await publish_usage(nc.jetstream(), [usage_event(tenant="hook-redirect", cost_micros=150)])

            async def retried():
                return len(hook.calls) >= 2  # a 3xx is a failed delivery, retried like a 500

            await eventually(retried, timeout=15)
    assert target.calls == []
    assert {method for method, _ in hook.calls} == {"POST"}


async def test_a_host_name_is_checked_by_what_it_resolves_to():
    """``localhost`` by name is a loopback address like any other, unless the name is allowlisted."""
    from bus.account.webhook_policy import WebhookPolicy
    from bus.destinations import DestinationRefused, GuardedResolver

    strict = GuardedResolver(WebhookPolicy(["10.0.0.0/8"]).address_allowed)
    with pytest.raises(DestinationRefused):
        await strict.resolve("localhost", 80)
    allowed = GuardedResolver(WebhookPolicy(["localhost"]).address_allowed)
    assert {r["host"] for r in await allowed.resolve("localhost", 80)} <= {"127.0.0.1", "::1"}
    await strict.close()
    await allowed.close()
