"""Usage is billed only when bound to a request that was admitted; what cannot be stored is dead-lettered.

Each forgery below was reproduced against the previous version (credits minted, another
tenant billed, a row stored for a tenant that does not exist) or stopped billing for
everyone (a NaN time). Every check that something was *not* stored is made after a good
event published behind it was stored: proof the meter got past it.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from bus.dead_letters import REASON_HEADER
from bus.account import credits
from bus.envelopes import MSG_ID_HEADER, seal_usage
from bus.issuers import register_issuer
from bus.protocol import IssuerGrant, Ticket, UsageReport, encode
from bus.signing import Identity
from bus.subjects import DEAD_LETTER_STREAM, usage_subject
from bus.account.tenants import Tenant
from infra.nats.roles import worker_role
from tests.conftest import CHAT_MODEL, UsageSigner, admin, eventually, usage_event, usage_rows


async def _prepaid(stack, nc, tenant: str, amount: int) -> None:
    await stack.tenancy(lambda store: store.create_tenant(Tenant(id=tenant, tier="enterprise", prepaid=True)))
    status, _ = await admin(stack, "POST", f"/admin/tenants/{tenant}/credits", json={"amount_micros": amount})
    assert status == 202

    async def granted():
        return await credits.available(nc.jetstream(), tenant) == amount

    await eventually(granted)


async def _dead_letters(js, request_ids: set[str]) -> dict[str, str]:
    """The reason each of these requests' usage was dead-lettered, by request id."""
    sub = await js.subscribe("tg.dead.usage", stream=DEAD_LETTER_STREAM, ordered_consumer=True)
    found = {}
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            try:
                data = msgspec.msgpack.decode(msg.data)  # a report, or a forgery's bare event
            except msgspec.DecodeError:
                continue  # another test's garbage: dead letters hold whatever could not be read
            if not isinstance(data, dict):
                continue
            rid = data["event"]["request_id"] if "event" in data else data.get("request_id")
            if rid in request_ids:
                found[rid] = msg.headers[REASON_HEADER]
    except TimeoutError:
        return found
    finally:
        await sub.unsubscribe()


async def _publish(js, subject: str, sealed: tuple[bytes, dict[str, str]]) -> None:
    data, headers = sealed
    await js.publish(subject, data, headers=headers)


async def test_forged_usage_mints_no_credits_and_bills_nobody(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    signer = UsageSigner.current
    await _prepaid(stack, nc, "mint-victim", 1_000)
    conn = await stack.connect(worker_role(CHAT_MODEL))  # what an attacker holding the worker role's credentials can do
    wjs = conn.jetstream()
    rogue_service = Identity.generate()
    await register_issuer(js, rogue_service.public_key, IssuerGrant("mint-svc", ["mint-victim"]))
    stranger = Identity.generate()

    def event(**fields):
        return usage_event(**{"tenant": "mint-victim", "principal": "k", "hold_micros": 10_000_000,
                              "cost_micros": 1, **fields})

    def ticket_for(e, issuer: Identity) -> Ticket:
        return Ticket(e.request_id, e.tenant, e.principal, issuer.public_key, e.kind, e.model, e.lane,
                      e.queued_at, e.queued_at + 60, e.hold_micros)

    forgeries = {}
    raw = event()  # the old wire form: an unsigned event
    forgeries[raw.request_id] = (encode(raw), {MSG_ID_HEADER: raw.request_id})
    unregistered = event()  # a well-formed report signed by a key nobody registered
    t = ticket_for(unregistered, signer.edge)
    forgeries[unregistered.request_id] = seal_usage(unregistered, t, signer.edge.sign(encode(t)), stranger)
    no_admission = event()  # the registered worker's key, but a ticket no issuer signed
    t = ticket_for(no_admission, signer.edge)
    forgeries[no_admission.request_id] = seal_usage(no_admission, t, stranger.sign(encode(t)), signer.worker)
    other_tenant = event(tenant="mint-bystander", hold_micros=0, cost_micros=5_000_000)  # billed for another's request
    t = ticket_for(msgspec.structs.replace(other_tenant, tenant="mint-victim"), signer.edge)
    forgeries[other_tenant.request_id] = seal_usage(other_tenant, t, signer.edge.sign(encode(t)), signer.worker)
    ghost = event(tenant="no-such-tenant", hold_micros=0)  # ticket signed by a service not allowed that tenant
    t = ticket_for(ghost, rogue_service)
    forgeries[ghost.request_id] = seal_usage(ghost, t, rogue_service.sign(encode(t)), signer.worker)
    service_hold = event()  # a registered service issuer setting a hold of its own
    t = ticket_for(service_hold, rogue_service)
    forgeries[service_hold.request_id] = seal_usage(service_hold, t, rogue_service.sign(encode(t)), signer.worker)
    inflated = event(cost_micros=20_000_000)  # costs more than the hold it settles
    forgeries[inflated.request_id] = signer.seal(inflated)
    for sealed in forgeries.values():
        await _publish(wjs, usage_subject("mint-victim"), sealed)
    good = usage_event(tenant="mint-victim", principal="k")
    await _publish(wjs, usage_subject(good.tenant), signer.seal(good))
    await conn.close()

    assert len(await usage_rows(clickhouse, [good.request_id], expect=1)) == 1, "the meter got past the forgeries"
    assert await usage_rows(clickhouse, list(forgeries), expect=0, timeout=0) == []
    assert await credits.available(js, "mint-victim") == 1_000, "no credits were minted"
    dead = await _dead_letters(js, set(forgeries))
    assert set(dead) == set(forgeries), dead
    assert dead[raw.request_id] == "unsigned"
    assert "ticket" in dead[no_admission.request_id] and "worker" not in dead[no_admission.request_id]
    assert "may not hold" in dead[service_hold.request_id]
    assert "exceeds the hold" in dead[inflated.request_id]


async def test_a_poison_event_is_dead_lettered_and_billing_flows_on(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    signer = UsageSigner.current
    # Numbers that once failed every insert for good, and stalled all billing behind them.
    nan_time = usage_event(queued_at=float("nan"))
    huge_hold = usage_event(hold_micros=2**63 - 1, cost_micros=1)
    far_future = usage_event(finished_at=1e18)
    poison = [nan_time, huge_hold, far_future]
    for e in poison:
        t = Ticket(e.request_id, e.tenant, e.principal, signer.edge.public_key, e.kind, e.model, e.lane,
                   time.time(), time.time() + 60, 0)
        report = msgspec.msgpack.encode(UsageReport(e, t, signer.edge.sign(encode(t))))
        headers = signer.worker.headers(report)
        headers[MSG_ID_HEADER] = e.request_id
        await js.publish(usage_subject(e.tenant), report, headers=headers)
    after = [usage_event() for _ in range(3)]
    for e in after:
        await _publish(js, usage_subject(e.tenant), signer.seal(e))
    assert len(await usage_rows(clickhouse, [e.request_id for e in after], expect=3)) == 3
    dead = await _dead_letters(js, {e.request_id for e in poison})
    assert set(dead) == {e.request_id for e in poison}
    assert all("malformed" in reason for reason in dead.values()), dead


async def test_an_event_clickhouse_keeps_refusing_is_dead_lettered_after_bounded_tries(stack, nc, meter, clickhouse):
    """ClickHouse refuses one event (a constraint stands in for any insert error): it goes to the
    dead letters after ``store_attempts`` tries; the events in its batch and after it are stored."""
    js = nc.jetstream()
    signer = UsageSigner.current
    await clickhouse.command("ALTER TABLE usage_events ADD CONSTRAINT refuse_poison CHECK tenant != 'poison-tenant'")
    try:
        refused = usage_event(tenant="poison-tenant")
        batch = [usage_event() for _ in range(4)]
        for e in [batch[0], refused, *batch[1:]]:
            await _publish(js, usage_subject(e.tenant), signer.seal(e))
        assert len(await usage_rows(clickhouse, [e.request_id for e in batch], expect=4, timeout=20)) == 4

        async def dead_lettered():
            return await _dead_letters(js, {refused.request_id})

        # Refused alone, it waits until another insert has worked; with others, it goes at once.
        dead = await eventually(dead_lettered, timeout=30)
        assert "ClickHouse refused it" in dead[refused.request_id]
    finally:
        await clickhouse.command("ALTER TABLE usage_events DROP CONSTRAINT refuse_poison")
    assert await usage_rows(clickhouse, [refused.request_id], expect=0, timeout=0) == []


async def test_while_clickhouse_refuses_every_insert_nothing_is_dead_lettered(stack, nc, meter, clickhouse):
    """An outage is not a bad event: the batch waits, past ``store_attempts``, and is stored once inserts
    work again."""
    js = nc.jetstream()
    signer = UsageSigner.current
    await clickhouse.command("ALTER TABLE usage_events ADD CONSTRAINT outage CHECK tenant = 'no-tenant-at-all'")
    events = [usage_event(tenant="outage-tenant") for _ in range(5)]
    try:
        await meter.stop()  # so the five arrive as one batch
        await asyncio.gather(*(_publish(js, usage_subject(e.tenant), signer.seal(e)) for e in events))
        await meter.start()

        async def tried_past_the_limit():
            return meter.billing.meter._failures > stack.settings.meter.store_attempts

        await eventually(tried_past_the_limit, timeout=20)
    finally:
        await clickhouse.command("ALTER TABLE usage_events DROP CONSTRAINT outage")
    assert len(await usage_rows(clickhouse, [e.request_id for e in events], expect=5, timeout=20)) == 5
    assert await _dead_letters(js, {e.request_id for e in events}) == {}


async def test_a_lone_event_refused_during_an_outage_waits_and_is_stored(stack, nc, meter, clickhouse):
    """One event alone proves nothing about itself: refused past ``store_attempts`` while every insert
    fails, it is put back, not dead-lettered, and stored once inserts work again."""
    js = nc.jetstream()
    await clickhouse.command("ALTER TABLE usage_events ADD CONSTRAINT outage CHECK tenant = 'no-tenant-at-all'")
    event = usage_event(tenant="outage-tenant")
    try:
        await _publish(js, usage_subject(event.tenant), UsageSigner.current.seal(event))

        async def refused_alone_and_put_back():
            return event.request_id in meter.billing.meter._refusals

        await eventually(refused_alone_and_put_back, timeout=20)
    finally:
        await clickhouse.command("ALTER TABLE usage_events DROP CONSTRAINT outage")
    assert len(await usage_rows(clickhouse, [event.request_id], expect=1, timeout=20)) == 1
    assert await _dead_letters(js, {event.request_id}) == {}
