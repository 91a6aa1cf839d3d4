"""Budgets: exactly one alert per budget, threshold and period, hard budgets refuse, webhooks retry signed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import datetime, timedelta, timezone

import aiohttp
from aiohttp import web

from bus.protocol import decode_alert
from bus.account.tenants import Tenant
from tests.conftest import CHAT_MODEL, admin, eventually, free_port, publish_usage, usage_event

ALL_THRESHOLDS = [50, 75, 90, 100]


async def _tenant(stack, tenant_id: str) -> tuple[str, str]:
    """An unlimited (enterprise) tenant and a key: its secret and its id."""
    async def make(store):
        await store.create_tenant(Tenant(id=tenant_id, tier="enterprise"))
        key, secret = await store.create_key(tenant_id, name="budgets")
        return secret, key.id

    return await stack.tenancy(make)


async def _budget(stack, **fields) -> dict:
    status, body = await admin(stack, "POST", "/admin/budgets", json=fields)
    assert status == 201, body
    return body


async def _alerts(clickhouse, budget_id: str) -> list[tuple[int, str]]:
    rows = await clickhouse.query(
        "SELECT threshold, period FROM budget_alerts WHERE budget_id = {b:String} ORDER BY period, threshold",
        {"b": budget_id})
    return [(int(t), p) for t, p in rows]


async def _events(nc, tenant: str) -> list[dict]:
    """Collects the budget events published for ``tenant`` from now on."""
    seen: list[dict] = []

    async def got(msg):
        seen.append(msg)

    await nc.subscribe(f"tg.event.budget.{tenant}", cb=got)
    return seen


async def test_one_large_request_raises_each_threshold_once_and_a_hard_budget_then_refuses(stack, nc, meter, clickhouse):
    secret, _ = await _tenant(stack, "budget-hard")
    budget = await _budget(stack, tenant="budget-hard", name="daily", amount_micros=60, period="daily", mode="hard")
    events = await _events(nc, "budget-hard")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    async with aiohttp.ClientSession() as http:
        first = await _chat(http, stack, secret)
        assert first[0] == 200, first

        async def crossed():
            alerts = await _alerts(clickhouse, budget["id"])
            return alerts if len(alerts) == 4 else None

        assert await eventually(crossed) == [(t, today) for t in ALL_THRESHOLDS]

        async def refused():
            status, body = await _chat(http, stack, secret)
            return (status, body) if status != 200 else None

        status, body = await eventually(refused)
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert body["error"]["type"] == "insufficient_quota"
    await asyncio.sleep(1.5)  # several more budget passes: none may alert again
    assert len(await _alerts(clickhouse, budget["id"])) == 4
    assert sorted(decode_alert(m.data).threshold for m in events) == ALL_THRESHOLDS


async def _chat(http, stack, key: str) -> tuple[int, dict]:
    async with http.post(stack.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Say hi"}],
                               "max_tokens": 2}) as resp:
        return resp.status, await resp.json()


async def test_many_concurrent_small_requests_raise_each_threshold_once(stack, nc, meter, clickhouse):
    _, key_id = await _tenant(stack, "budget-many")
    budget = await _budget(stack, tenant="budget-many", name="key-cap", key=key_id, amount_micros=1_000,
                           period="monthly")
    events = await _events(nc, "budget-many")
    # 200 requests of 10 micro-credits each, metered in whatever batches they land in; another key's do not count.
    await publish_usage(nc.jetstream(), [
        usage_event(tenant="budget-many", principal=key_id, cost_micros=10) for _ in range(200)
    ] + [usage_event(tenant="budget-many", principal="someone-else", cost_micros=10_000)])
    month = datetime.now(timezone.utc).strftime("%Y-%m")

    async def crossed():
        alerts = await _alerts(clickhouse, budget["id"])
        return alerts if len(alerts) == 4 else None

    assert await eventually(crossed, timeout=15) == [(t, month) for t in ALL_THRESHOLDS]
    await asyncio.sleep(1.5)
    assert len(await _alerts(clickhouse, budget["id"])) == 4
    assert sorted(decode_alert(m.data).threshold for m in events) == ALL_THRESHOLDS


async def test_each_period_gets_its_own_alerts(stack, nc, meter, clickhouse):
    await _tenant(stack, "budget-days")
    budget = await _budget(stack, tenant="budget-days", name="daily", amount_micros=100, period="daily",
                           thresholds=[50])
    now = datetime.now(timezone.utc)
    yesterday = (now - timedelta(days=1)).replace(hour=12, minute=0)
    await publish_usage(nc.jetstream(), [
        usage_event(tenant="budget-days", cost_micros=60, queued_at=yesterday.timestamp()),
        usage_event(tenant="budget-days", cost_micros=30, queued_at=time.time()),
    ])
    tracker = meter.billing.budgets
    await eventually(lambda: _rows_for(clickhouse, "budget-days", 2))
    await tracker.refresh({"budget-days"}, now=yesterday.timestamp() + 1800)
    assert await _alerts(clickhouse, budget["id"]) == [(50, yesterday.strftime("%Y-%m-%d"))]
    await tracker.refresh({"budget-days"})
    assert len(await _alerts(clickhouse, budget["id"])) == 1, "today's 30 of 100 is under 50%"
    await publish_usage(nc.jetstream(), [usage_event(tenant="budget-days", cost_micros=30)])

    async def today_crossed():
        alerts = await _alerts(clickhouse, budget["id"])
        return alerts if len(alerts) == 2 else None

    assert await eventually(today_crossed) == [(50, yesterday.strftime("%Y-%m-%d")), (50, now.strftime("%Y-%m-%d"))]


async def test_usage_queued_before_midnight_and_stored_after_alerts_for_its_own_day(stack, nc, meter, clickhouse):
    await _tenant(stack, "budget-late")
    budget = await _budget(stack, tenant="budget-late", name="daily", amount_micros=100, period="daily",
                           thresholds=[50])
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    await publish_usage(nc.jetstream(), [
        usage_event(tenant="budget-late", cost_micros=60, queued_at=midnight.timestamp() - 10),
    ])
    await eventually(lambda: _rows_for(clickhouse, "budget-late", 1))
    # Billing looks just after midnight: the usage belongs to the day that ended, which crossed 50 %.
    await meter.billing.budgets.refresh({"budget-late"}, now=midnight.timestamp() + 30)
    yesterday = (midnight - timedelta(days=1)).strftime("%Y-%m-%d")
    assert await _alerts(clickhouse, budget["id"]) == [(50, yesterday)]


async def _rows_for(clickhouse, tenant: str, n: int) -> bool:
    [(count,)] = await clickhouse.query("SELECT count() FROM usage_events WHERE tenant = {t:String}", {"t": tenant})
    return count >= n


async def test_webhooks_are_signed_retried_and_carry_one_idempotency_key(stack, nc, meter, clickhouse):
    calls: list[tuple[dict, bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        calls.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(calls) == 1 else 200)  # the first attempt fails

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await _tenant(stack, "budget-hook")
        budget = await _budget(stack, tenant="budget-hook", name="alerts", amount_micros=100, thresholds=[100],
                               webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret="whsec-test")
        assert budget["webhook_secret"] == "set", "the secret is never shown back"
        await publish_usage(nc.jetstream(), [usage_event(tenant="budget-hook", cost_micros=150)])

        async def delivered():
            return len(calls) >= 2

        await eventually(delivered, timeout=15)
        await asyncio.sleep(1.0)
    finally:
        await runner.cleanup()
    assert len(calls) == 2, "retried once after the failure, then never again"
    [alert_id] = {headers["Idempotency-Key"] for headers, _ in calls}
    for headers, body in calls:
        t, v1 = (part.split("=", 1)[1] for part in headers["Tollgate-Signature"].split(","))
        expected = hmac.new(b"whsec-test", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(v1, expected)
        alert = json.loads(body)
        assert alert["id"] == alert_id and alert["threshold"] == 100 and alert["spent_micros"] == 150


async def test_bad_budgets_are_refused(stack, meter):
    base = {"tenant": "default", "name": "bad", "amount_micros": 100}
    for change in ({"amount_micros": 0}, {"period": "rolling"}, {"window_s": 60}, {"thresholds": [0]},
                   {"webhook_url": "ftp://example"}, {"period": "weekly"}, {"mode": "strict"},
                   {"amount_micros": 2**64}, {"tenant": "a b"}, {"tenant": ""}):
        status, body = await admin(stack, "POST", "/admin/budgets", json={**base, **change})
        assert status == 400 and body["error"]["type"] == "invalid_request_error", change
    status, body = await admin(stack, "POST", "/admin/budgets", json={**base, "tenant": "nobody"})
    assert status == 404
    status, body = await admin(stack, "GET", "/admin/tenants/a%20b/credits")
    assert status == 404, body


async def test_a_rolling_budget_counts_only_its_window(stack, nc, meter, clickhouse):
    await _tenant(stack, "budget-rolling")
    budget = await _budget(stack, tenant="budget-rolling", name="hourly", amount_micros=100, period="rolling",
                           window_s=3600, thresholds=[50])
    now = time.time()
    await publish_usage(nc.jetstream(), [
        usage_event(tenant="budget-rolling", cost_micros=80, queued_at=now - 2 * 3600),  # out of the window
        usage_event(tenant="budget-rolling", cost_micros=30, queued_at=now),
    ])
    await eventually(lambda: _rows_for(clickhouse, "budget-rolling", 2))
    await meter.billing.budgets.refresh({"budget-rolling"})
    assert await _alerts(clickhouse, budget["id"]) == []
    await publish_usage(nc.jetstream(), [usage_event(tenant="budget-rolling", cost_micros=30)])

    async def crossed():
        return await _alerts(clickhouse, budget["id"])

    [(threshold, period)] = await eventually(crossed)
    assert threshold == 50 and period.startswith("w")
