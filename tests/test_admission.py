"""Admission under hostile use: nothing leaks when clients vanish, refusals hoard nothing,
full lanes answer at once, and lower lanes keep moving under a flood."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import msgspec
import openai

from bus.account import credits
from bus.subjects import INFLIGHT_BUCKET, REQUESTS_STREAM, request_subject
from tests.conftest import CHAT_MODEL, admin, eventually, fresh_minute, request_id, usage_rows
from tests.test_credits import _grant, _prepaid_tenant, _short_deadline_edge
from tests.test_tenancy import HI, _tenant


async def _in_flight(nc, scope: str) -> int:
    kv = await nc.jetstream().key_value(INFLIGHT_BUCKET)
    try:
        counts = msgspec.msgpack.decode((await kv.get(scope)).value)
    except Exception:
        return 0
    return sum(count for count, _ in counts.values())


async def test_clients_that_vanish_mid_admission_leak_no_hold_and_no_slot(stack, nc, meter, clickhouse):
    """200 requests, each reset 0-5 ms after it was sent: afterwards every credit is back or
    debited for usage, and the tenant's four in-flight slots are all free again."""
    tenant = "vanishing"
    key = await _prepaid_tenant(stack, tenant)
    status, _ = await admin(stack, "PATCH", f"/admin/tenants/{tenant}", json={"limits": {"concurrency": 4}})
    assert status == 200
    await _grant(stack, nc, tenant, 1_000_000)
    short = await _short_deadline_edge(stack)  # holds of requests that never ran are swept within seconds
    body = {"model": CHAT_MODEL, "messages": HI, "max_tokens": 2}

    async with aiohttp.ClientSession() as http:
        async def vanish():
            task = asyncio.create_task(http.post(short + "/v1/chat/completions", json=body,
                                                 headers={"Authorization": f"Bearer {key}"}))
            await asyncio.sleep(random.uniform(0, 0.005))
            task.cancel()
            try:
                (await task).release()
            except (asyncio.CancelledError, aiohttp.ClientError):
                pass

        await asyncio.gather(*(vanish() for _ in range(200)))

    async def all_credits_accounted():
        debited = await clickhouse.query(
            "SELECT sum(cost_micros) FROM usage_events WHERE tenant = {t:String}", {"t": tenant})
        return await credits.available(nc.jetstream(), tenant) + (debited[0][0] or 0) == 1_000_000

    await eventually(all_credits_accounted, timeout=45)

    async def slots_free():
        return await _in_flight(nc, f"t.{tenant}") == 0

    await eventually(slots_free, timeout=10)
    # And four at once are admitted again.
    client = stack.client(api_key=key)
    done = await asyncio.gather(*(client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=1)
                                  for _ in range(4)))
    assert len(done) == 4


async def test_a_refused_oversized_request_hoards_nothing_on_any_edge(stack, second_edge, meter):
    key = await _tenant(stack, "hoarded", limits={"tpm": 2000})
    await fresh_minute()
    try:
        await stack.client(api_key=key).chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=5000)
        raise AssertionError("5,000 tokens cannot fit a 2,000-token minute")
    except openai.RateLimitError as exc:
        assert exc.type == "tokens"
    other = stack.client(api_key=key, base_url=second_edge)
    for _ in range(3):  # the other edge still has the tenant's minute to spend
        await other.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=5)


async def test_a_refusal_at_the_key_gives_back_what_the_tenant_scope_took(stack, meter):
    await _tenant(stack, "twokeys", limits={"tpm": 1000})
    _, small = await admin(stack, "POST", "/admin/tenants/twokeys/keys", json={"limits": {"tpm": 300}})
    _, free = await admin(stack, "POST", "/admin/tenants/twokeys/keys", json={})
    await fresh_minute()
    small_client = stack.client(api_key=small["key"])
    await small_client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=250)
    for _ in range(8):  # each refused at its key, after the tenant scope had taken its tokens
        try:
            await small_client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=250)
            raise AssertionError("the key's 300 tokens are spent")
        except openai.RateLimitError as exc:
            assert "API key" in exc.message
    # The tenant's minute still has room for the other key.
    await stack.client(api_key=free["key"]).chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=250)


async def test_a_full_lane_refuses_at_once_with_retry_after(stack, nc, meter):
    """More than ``max_queued`` requests for one model and lane: the rest get 503 queue_full at once."""
    key = await _tenant(stack, "flooding", tier="enterprise")
    bound = stack.settings.worker.max_queued
    body = {"model": CHAT_MODEL, "messages": HI, "max_tokens": 1, "service_tier": "flex"}
    async with aiohttp.ClientSession() as http:
        async def one():
            started = time.monotonic()
            async with http.post(stack.base_url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After"), time.monotonic() - started

        tasks = [asyncio.create_task(one()) for _ in range(bound + 40)]
        refused = []
        for next_done in asyncio.as_completed(tasks):
            status, body_, retry_after, took = await next_done
            if status == 503:
                refused.append((body_, retry_after, took))
            if len(refused) >= 20:
                break
        for task in tasks:  # the queued ones are cancelled: their clients leave
            task.cancel()
    assert all(b["error"]["code"] == "queue_full" for b, _, _ in refused), refused[:3]
    assert all(r is not None and int(r) >= 1 for _, r, _ in refused)
    assert max(took for _, _, took in refused) < 5, "answered at once, not at the deadline"

    async def lane_drained():  # the queued requests' clients left: they leave the queue unrun
        info = await nc.jetstream().stream_info(REQUESTS_STREAM, subjects_filter=request_subject("batch", CHAT_MODEL))
        return not info.state.subjects

    await eventually(lane_drained, timeout=60)


async def test_a_flood_on_the_high_lane_does_not_stop_the_batch_lane(stack, meter, clickhouse):
    key = await _tenant(stack, "lanes", tier="enterprise")  # its default lane is high
    client = stack.client(api_key=key)
    finished: dict[str, float] = {}

    async def ask(tier: str, i: int):
        reply = await client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=1, temperature=0,
                                                     service_tier=tier)
        finished[f"{tier}-{i}"] = time.monotonic()
        return reply

    flood = [asyncio.create_task(ask("default", i)) for i in range(16)]
    await asyncio.sleep(0.3)  # the high lane is deep before the batch requests arrive
    trickle = [asyncio.create_task(ask("flex", i)) for i in range(2)]
    replies = await asyncio.gather(*flood, *trickle)
    last_high = max(t for name, t in finished.items() if name.startswith("default"))
    assert all(finished[f"flex-{i}"] < last_high for i in range(2)), "batch work progressed during the flood"
    rows = await usage_rows(clickhouse, [request_id(r.id) for r in replies[-2:]], expect=2)
    assert {r["lane"] for r in rows} == {"batch"}
