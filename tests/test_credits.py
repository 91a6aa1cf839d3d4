"""Prepaid credits: holds at admission, exact settlement, zero overspend under concurrency, expiry."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import datetime, timezone

import aiohttp
import msgspec
import pytest

from bus.account import credits
from bus.envelopes import MSG_ID_HEADER
from bus.protocol import ChatBody, ChatMessage, CreditEntry, HoldNotice, encode
from bus.account.tenants import Tenant
from bus.openai.chat import charge
from billing.expiry import unspent
from bus.subjects import EVENTS_STREAM, HOLDS_STREAM, METER_CONSUMER, USAGE_STREAM, credit_event_subject, hold_subject
from tests.conftest import (
    CHAT_MODEL, admin, eventually, free_port, meter_dies_before_acking, publish_usage, usage_event, usage_rows,
)

PROMPT = [{"role": "user", "content": "Say hi"}]
MAX_TOKENS = 2


async def _prepaid_tenant(stack, tenant_id: str) -> str:
    """A prepaid tenant with no rate limits (enterprise tier), and a key for it."""
    async def make(store):
        await store.create_tenant(Tenant(id=tenant_id, tier="enterprise", prepaid=True))
        return (await store.create_key(tenant_id, name="prepaid"))[1]

    key = await stack.tenancy(make)

    async def edge_knows_it():
        async with aiohttp.ClientSession() as http:
            return (await _own_credits(http, stack, key))[0] == 200

    await eventually(edge_knows_it)
    return key


def _hold(stack, lane: str = "high") -> int:
    """What one PROMPT request with MAX_TOKENS holds (on the enterprise tier's default lane, high)."""
    body = ChatBody(messages=[ChatMessage(**m) for m in PROMPT], max_tokens=MAX_TOKENS)
    return stack.settings.model(CHAT_MODEL).prices.cost(charge(body).max_units, stack.settings.lane_multipliers[lane])


async def _grant(stack, nc, tenant: str, amount: int, **extra) -> dict:
    before = await credits.available(nc.jetstream(), tenant)
    status, entry = await admin(stack, "POST", f"/admin/tenants/{tenant}/credits", json={"amount_micros": amount, **extra})
    assert status == 202, entry

    async def applied():
        return await credits.available(nc.jetstream(), tenant) == before + amount

    await eventually(applied)
    return entry


async def _chat(http: aiohttp.ClientSession, stack, key: str, **extra) -> tuple[int, dict, str | None]:
    body = {"model": CHAT_MODEL, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    async with http.post(stack.base_url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json(), resp.headers.get("x-request-id")


async def _ledger(clickhouse, tenant: str) -> list[tuple]:
    return await clickhouse.query(
        "SELECT kind, amount_micros, request_id, grant_id FROM credit_ledger FINAL WHERE tenant = {t:String} "
        "ORDER BY at", {"t": tenant})


async def test_no_overspend_when_300_requests_race_for_credits_that_cover_20(stack, nc, meter, clickhouse):
    tenant = "prepaid-race"
    key = await _prepaid_tenant(stack, tenant)
    hold = _hold(stack)
    granted = 20 * hold
    await _grant(stack, nc, tenant, granted)

    ledger_lowest = 0
    sampling = True

    async def sample_ledger():
        nonlocal ledger_lowest
        while sampling:
            [(balance,)] = await clickhouse.query(
                "SELECT sum(amount_micros) FROM credit_ledger WHERE tenant = {t:String}", {"t": tenant})
            ledger_lowest = min(ledger_lowest, balance)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_ledger())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        results = await asyncio.gather(*(_chat(http, stack, key) for _ in range(300)))

    ran = [rid for status, _, rid in results if status == 200]
    refused = [body for status, body, _ in results if status != 200]
    assert 1 <= len(ran) <= 20
    assert len(ran) + len(refused) == 300
    assert {(b["error"]["type"], b["error"]["code"]) for b in refused} == {("insufficient_quota", "insufficient_quota")}

    rows = await usage_rows(clickhouse, ran, expect=len(ran))
    spent = sum(r["cost_micros"] for r in rows)
    assert len(rows) == len(ran) and 0 < spent <= granted

    async def settled():
        return await credits.available(nc.jetstream(), tenant) == granted - spent

    await eventually(settled)
    ledger = await eventually(lambda: _debits_in(clickhouse, tenant, len(ran)))
    sampling = False
    await sampler
    assert sum(amount for _, amount, _, _ in ledger) == granted - spent >= 0, "the ledger's balance is what is left"
    assert ledger_lowest >= 0, "the balance never went below zero while the debits came in"


async def _debits_in(clickhouse, tenant: str, n: int):
    rows = await _ledger(clickhouse, tenant)
    return rows if sum(kind == "debit" for kind, *_ in rows) == n else None


async def test_a_request_is_debited_its_real_cost_not_its_hold(stack, nc, meter, clickhouse):
    tenant = "prepaid-exact"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 1_000_000, kind="topup")
    async with aiohttp.ClientSession() as http:
        status, body, rid = await _chat(http, stack, key)
    assert status == 200, body
    [row] = await usage_rows(clickhouse, [rid], expect=1)
    cost = row["cost_micros"]
    assert 0 < cost < _hold(stack)

    async def settled():
        return await credits.available(nc.jetstream(), tenant) == 1_000_000 - cost

    await eventually(settled)
    ledger = await eventually(lambda: _debits_in(clickhouse, tenant, 1))
    assert [(k, a) for k, a, _, _ in ledger] == [("topup", 1_000_000), ("debit", -cost)]


async def test_a_tenant_without_credits_gets_insufficient_quota_and_nothing_is_queued(stack, nc, meter, clickhouse):
    key = await _prepaid_tenant(stack, "prepaid-empty")
    async with aiohttp.ClientSession() as http:
        status, body, _ = await _chat(http, stack, key)
        own_status, own = await _own_credits(http, stack, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    assert own_status == 200 and own["available_micros"] == 0


async def _own_credits(http, stack, key):
    async with http.get(stack.base_url + "/v1/credits", headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def test_a_request_that_never_runs_gets_its_hold_back(stack, nc, meter, clickhouse):
    tenant = "prepaid-expired"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 100_000)
    short = await _short_deadline_edge(stack)
    story = [{"role": "user", "content": "Write a long story about a fox."}]
    async with aiohttp.ClientSession() as http:
        # Keep the only worker busy with normal-lane work well past the prepaid request's 2 s
        # deadline; sent on the batch lane (flex), it waits behind all of it and expires queued.
        busy = [asyncio.create_task(_chat(http, stack, stack.api_key, max_tokens=300, messages=story))
                for _ in range(3)]
        await asyncio.sleep(0.5)
        async with http.post(short + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": CHAT_MODEL, "messages": PROMPT, "max_tokens": MAX_TOKENS,
                                   "service_tier": "flex"}) as resp:
            assert resp.status == 504
            rid = resp.headers["x-request-id"]
        assert await credits.available(nc.jetstream(), tenant) == 100_000 - _hold(stack, "batch"), "still held"

        async def released():
            return await credits.available(nc.jetstream(), tenant) == 100_000

        await eventually(released, timeout=20)
        for task in busy:
            task.cancel()
    assert await usage_rows(clickhouse, [rid], expect=1, timeout=0.5) == [], "it never ran"


async def _short_deadline_edge(stack) -> str:
    port = free_port()
    stack.spawn("edge", "edge", env={"TOLLGATE_EDGE_PORT": str(port), "TOLLGATE_EDGE_REQUEST_TIMEOUT_S": "2"})
    base_url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(stack.wait_serving, CHAT_MODEL, base_url=base_url, timeout=60)
    return base_url


async def test_expiring_grants_are_spent_first_and_their_rest_lapses(stack, nc, meter, clickhouse):
    tenant = "prepaid-expiry"
    key = await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 500_000, kind="topup")
    grant = await _grant(stack, nc, tenant, 300_000, expires_in=3)
    async with aiohttp.ClientSession() as http:
        status, body, rid = await _chat(http, stack, key)
    assert status == 200, body
    [row] = await usage_rows(clickhouse, [rid], expect=1)
    cost = row["cost_micros"]

    async def lapsed():
        rows = await _ledger(clickhouse, tenant)
        return [r for r in rows if r[0] == "expire"]

    [(_, amount, _, grant_id)] = await eventually(lapsed, timeout=15)
    # The request was paid from the grant that expires first; only the rest of it lapsed.
    assert grant_id == grant["id"] and amount == -(300_000 - cost)
    assert await credits.available(nc.jetstream(), tenant) == 500_000


async def test_a_request_held_across_a_lapse_is_paid_by_that_grant_and_takes_no_other_credits(stack, nc, meter,
                                                                                             clickhouse):
    js = nc.jetstream()
    tenant = "prepaid-across-lapse"
    await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 50_000, kind="topup")
    await _grant(stack, nc, tenant, 100_000, expires_in=2)
    # A request holds the whole grant while it is live, as the edge would, and runs past the lapse.
    event = usage_event(tenant=tenant, principal="k", hold_micros=100_000, cost_micros=100_000)
    assert await credits.hold(js, tenant, event.request_id, event.hold_micros)
    await credits.report_hold(js, HoldNotice(event.request_id, tenant, event.hold_micros, time.time() + 60))
    # Past the lapse and two expiry passes: the grant's credits are all held, the top-up's all available.
    await asyncio.sleep(3 + 2 * stack.settings.meter.expiry_interval_s)
    assert not [r for r in await _ledger(clickhouse, tenant) if r[0] == "expire"], "the top-up must not lapse"

    await publish_usage(js, [msgspec.structs.replace(event, finished_at=time.time())])
    await usage_rows(clickhouse, [event.request_id], expect=1)

    async def hold_closed():
        info = await js.stream_info(HOLDS_STREAM, subjects_filter=hold_subject(tenant))
        return not info.state.subjects

    await eventually(hold_closed, timeout=15)
    await asyncio.sleep(2 * stack.settings.meter.expiry_interval_s)
    # The grant paid for the request (held while it was live) and has nothing left to lapse.
    assert not [r for r in await _ledger(clickhouse, tenant) if r[0] == "expire"]
    assert await credits.available(js, tenant) == 50_000
    assert sum(r[1] for r in await _ledger(clickhouse, tenant)) == 50_000


@pytest.mark.parametrize("change", [
    {"amount_micros": 0}, {"amount_micros": 2**63}, {"amount_micros": 5, "kind": "refund", "expires_in": 9},
    {"amount_micros": 5, "kind": "gift"}, {"amount_micros": 5, "expires_at": 1_767_225_600_000},
    {"amount_micros": 5, "expires_in": -60}, {"amount_micros": 5, "expires_in": 60, "expires_at": 2e9},
    # ids billing makes itself (an expiry of grant g, a debit), and ids of no length or no bound
    {"amount_micros": 5, "id": "expire-g-0"}, {"amount_micros": 5, "id": "debit-r1"}, {"amount_micros": 5, "id": ""},
    {"amount_micros": 5, "id": "x" * 257},
])
async def test_bad_credit_changes_are_refused_and_nothing_is_recorded(stack, nc, meter, change):
    before = (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq
    status, body = await admin(stack, "POST", "/admin/tenants/default/credits", json=change)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq == before


async def test_a_retried_grant_is_applied_once(stack, nc, meter, clickhouse):
    tenant = "prepaid-retry"
    await _prepaid_tenant(stack, tenant)
    for _ in range(3):
        status, _ = await admin(stack, "POST", f"/admin/tenants/{tenant}/credits",
                                json={"amount_micros": 7_000, "id": "invoice-42"})
        assert status == 202

    async def applied():
        return await credits.available(nc.jetstream(), tenant) == 7_000

    await eventually(applied)
    # The same entry again past the bus's dedupe window (here: under another message id) finds
    # its ledger row and changes nothing.
    [(kind, amount, _, _)] = await eventually(lambda: _ledger(clickhouse, tenant))
    entry = CreditEntry(id="invoice-42", tenant=tenant, kind=kind, amount_micros=amount, at=time.time())
    await nc.jetstream().publish(credit_event_subject(tenant), encode(entry), headers={MSG_ID_HEADER: "later"})
    await asyncio.sleep(1.0)  # long enough for a second application to show, were there one
    assert await credits.available(nc.jetstream(), tenant) == 7_000
    assert len(await _ledger(clickhouse, tenant)) == 1


async def _credit(stack, tenant: str, amount: int, entry_id: str, **extra) -> tuple[int, dict]:
    return await admin(stack, "POST", f"/admin/tenants/{tenant}/credits",
                       json={"amount_micros": amount, "id": entry_id, **extra})


async def test_a_balance_stops_short_of_what_the_ledger_can_sum(stack, nc, meter):
    tenant = "prepaid-cap"
    await _prepaid_tenant(stack, tenant)
    almost = credits.MAX_BALANCE_MICROS - 1
    status, _ = await _credit(stack, tenant, almost, "huge-1")
    assert status == 202
    await eventually(lambda: _available_is(nc, tenant, almost))
    status, body = await _credit(stack, tenant, 2, "huge-2")  # past the cap by one micro-credit
    assert status == 400 and body["error"]["param"] == "amount_micros", body
    status, body = await _credit(stack, tenant, almost, "huge-1")  # a retry still answers
    assert status == 202 and body["id"] == "huge-1", body
    status, _ = await _credit(stack, tenant, 1, "huge-3")  # the cap itself is reachable
    assert status == 202
    await eventually(lambda: _available_is(nc, tenant, credits.MAX_BALANCE_MICROS))


async def _available_is(nc, tenant: str, amount: int) -> bool:
    return await credits.available(nc.jetstream(), tenant) == amount


async def test_ledger_ids_are_per_tenant(stack, nc, meter, clickhouse):
    a, b = "prepaid-ids-a", "prepaid-ids-b"
    for tenant in (a, b):
        await _prepaid_tenant(stack, tenant)
        status, entry = await _credit(stack, tenant, 1_000, "inv-1")
        assert status == 202 and entry["tenant"] == tenant, entry

    async def both_applied():
        return [await credits.available(nc.jetstream(), t) for t in (a, b)] == [1_000, 1_000]

    await eventually(both_applied)
    for tenant in (a, b):
        assert await eventually(lambda: _ledger(clickhouse, tenant)) == [("grant", 1_000, None, None)]


async def test_billing_applies_another_tenants_entry_under_a_used_id(stack, nc, meter, clickhouse):
    # Straight onto the bus, under a message id of its own: only billing's ledger lookup decides.
    a, b = "prepaid-bus-a", "prepaid-bus-b"
    for tenant in (a, b):
        await _prepaid_tenant(stack, tenant)
        entry = CreditEntry(id="inv-bus", tenant=tenant, kind="grant", amount_micros=500, at=time.time())
        await nc.jetstream().publish(credit_event_subject(tenant), encode(entry), headers={MSG_ID_HEADER: tenant})
        await eventually(lambda: _ledger(clickhouse, tenant))
    assert await credits.available(nc.jetstream(), b) == 500


async def test_an_id_reused_for_a_different_change_is_a_conflict_and_a_retry_is_applied_once(stack, nc, meter,
                                                                                            clickhouse):
    tenant = "prepaid-reuse"
    await _prepaid_tenant(stack, tenant)
    status, first = await _credit(stack, tenant, 1_000, "inv-9")
    assert status == 202
    for amount, extra in ((2_000, {}), (1_000, {"kind": "topup"})):
        status, body = await _credit(stack, tenant, amount, "inv-9", **extra)
        assert status == 409 and body["error"]["code"] == "idempotency_key_reused", body
        assert body["error"]["param"] == "id"
    status, again = await _credit(stack, tenant, 1_000, "inv-9", note="sent again")
    assert status == 202 and again == first  # the entry that stands, as first recorded
    with pytest.raises(subprocess.CalledProcessError):  # the CLI refuses it too
        await asyncio.to_thread(stack.cli, "credits", "add", tenant, "3000", "--id", "inv-9")

    async def applied():
        return await credits.available(nc.jetstream(), tenant) == 1_000

    await eventually(applied)
    await asyncio.sleep(1.0)  # long enough for a second application to show, were there one
    assert await credits.available(nc.jetstream(), tenant) == 1_000
    assert await _ledger(clickhouse, tenant) == [("grant", 1_000, None, None)]


async def test_an_operator_grants_credits_and_sets_a_budget_from_the_cli(stack, nc, meter):
    run = asyncio.to_thread
    tenant = await run(stack.cli, "tenants", "create", "prepaid-cli", "--tier", "pro", "--prepaid")
    assert tenant["prepaid"] is True
    for _ in range(2):  # a retried command with the same id changes the balance once
        entry = await run(stack.cli, "credits", "add", "prepaid-cli", "2500000", "--id", "inv-7", "--expires-in", "86400")
    assert entry["kind"] == "grant" and entry["expires_at"] > entry["at"]

    async def shown():
        return (await run(stack.cli, "credits", "show", "prepaid-cli"))["available_micros"] == 2_500_000

    await eventually(shown)
    budget = await run(stack.cli, "budgets", "set", "prepaid-cli", "monthly", "1000000", "--mode", "hard",
                       "--thresholds", "80,100")
    assert budget["id"] == "prepaid-cli.monthly" and budget["thresholds"] == [80, 100]
    assert [b["id"] for b in await run(stack.cli, "budgets", "list", "--tenant", "prepaid-cli")] == ["prepaid-cli.monthly"]


async def test_a_meter_crash_between_settling_and_acking_settles_each_hold_once(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    tenant = "prepaid-crash"
    await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 10_000)
    events = [usage_event(tenant=tenant, principal="k", hold_micros=1_000, cost_micros=300) for _ in range(5)]
    for e in events:
        assert await credits.hold(js, tenant, e.request_id, e.hold_micros)
    assert await credits.available(js, tenant) == 5_000

    before = await js.consumer_info(USAGE_STREAM, METER_CONSUMER)
    await meter_dies_before_acking(meter, js, events)  # inserted and settled, never acked
    assert await credits.available(js, tenant) == 10_000 - 5 * 300
    await meter.start()  # redelivered after ack_wait: stored already, settled already

    async def all_acked():
        info = await js.consumer_info(USAGE_STREAM, METER_CONSUMER)
        redeliveries = info.delivered.consumer_seq - info.delivered.stream_seq
        earlier = before.delivered.consumer_seq - before.delivered.stream_seq
        return info.num_ack_pending == 0 and info.num_pending == 0 and redeliveries > earlier

    await eventually(all_acked, timeout=15)
    assert await credits.available(js, tenant) == 10_000 - 5 * 300, "no hold settled twice"
    ledger = await eventually(lambda: _debits_in(clickhouse, tenant, 5))
    assert sum(amount for _, amount, _, _ in ledger) == 10_000 - 5 * 300


def test_spending_after_a_grant_lapsed_is_not_paid_from_it():
    def at(t: float) -> datetime:
        return datetime.fromtimestamp(t, timezone.utc)

    rows = [  # id, kind, amount, at, expires_at, grant_id
        ("g", "grant", 300, at(0), at(100), None),
        ("x1", "expire", -50, at(100), None, "g"),  # only 50 lapsed at first: 250 was held then
        ("t", "topup", 1_000, at(101), None, None),
        ("d", "debit", -240, at(105), None, None),
    ]
    assert unspent(rows) == {"g": (250, 1), "t": (760, 0)}


async def test_usage_stored_past_the_settle_window_is_settled_once_from_the_recorded_hold(stack, nc, meter,
                                                                                         clickhouse):
    """Billing was down for longer than the counter's dedupe window: the meter does not settle such
    usage (a settlement could then count twice); the sweeper settles it once, from the hold notice."""
    tenant = "prepaid-late"
    await _prepaid_tenant(stack, tenant)
    await _grant(stack, nc, tenant, 10_000)
    js = nc.jetstream()
    queued = time.time() - credits.settle_window_s(stack.settings) - 30
    event = usage_event(tenant=tenant, principal="k", queued_at=queued, hold_micros=3_000, cost_micros=1_200)
    assert await credits.hold(js, tenant, event.request_id, 3_000)
    await credits.report_hold(js, HoldNotice(event.request_id, tenant, 3_000, queued + 60))
    await publish_usage(js, [event])
    await usage_rows(clickhouse, [event.request_id], expect=1)

    async def settled():
        return await credits.available(js, tenant) == 10_000 - 1_200

    await eventually(settled, timeout=20)  # before, this hold stayed taken for good
