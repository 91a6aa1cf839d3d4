"""A meter killed at any point of a batch, while another meter runs beside it under continuing
traffic: every event is stored exactly once.

With an ack-all consumer the meter beside the dying one acked newer events, and each such
ack also covered the dead meter's batch still waiting to be redelivered: that usage was lost
(152 answered requests -> 125 rows). Acks now name one event each.
"""

from __future__ import annotations

import asyncio
import itertools

from billing.meter import COLUMNS, Meter, columns
from bus.envelopes import open_usage
from tests.conftest import publish_usage, usage_event, usage_rows

POINTS = ("delivered", "partly inserted", "inserted", "settled", "acked")
KILLS = 20


async def _die_at(point: str, meter: Meter, clickhouse) -> None:
    """Take one batch from the shared consumer and stop handling it at ``point``."""
    batch = await meter.fetch()
    if not batch or point == "delivered":
        return
    events = [open_usage(m.data, m.headers, meter._issuers.get, meter.settings.max_deadline_s) for m in batch]
    if point == "partly inserted":
        half = events[: len(events) // 2 or 1]
        await clickhouse.insert_columns("usage_events", columns(half), COLUMNS)
    elif point == "inserted":
        await clickhouse.insert_columns("usage_events", columns(events), COLUMNS)
    elif point == "settled":
        await meter.store(batch)  # inserted and holds settled, not acked
    else:
        await meter.handle(batch)


async def test_killing_a_meter_mid_batch_twenty_times_loses_and_doubles_nothing(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    published = []
    stop = asyncio.Event()
    counter = itertools.count()

    async def traffic():
        while not stop.is_set():
            batch = [usage_event(tenant="meter-kill", input_units=n, output_units=n % 7)
                     for n in itertools.islice(counter, 7)]
            holds = [usage_event(tenant="meter-kill", input_units=n, hold_micros=500, cost_micros=n % 100)
                     for n in itertools.islice(counter, 1)]
            await publish_usage(js, batch + holds)
            published.extend(batch + holds)
            await asyncio.sleep(0.01)

    sending = asyncio.create_task(traffic())
    try:
        for kill in range(KILLS):
            conn = await stack.connect("billing")
            dying = Meter(stack.settings, conn, clickhouse)
            await dying.start()
            await _die_at(POINTS[kill % len(POINTS)], dying, clickhouse)
            await conn.close()  # gone: it acks nothing more; the session's meter keeps running
    finally:
        stop.set()
        await sending

    ids = [e.request_id for e in published]
    assert len(ids) > 100
    rows = await usage_rows(clickhouse, ids, expect=len(ids), timeout=40)
    assert {r["request_id"]: (r["input_units"], r["output_units"]) for r in rows} == {
        e.request_id: (e.input_units, e.output_units) for e in published
    }, "every event stored, with its own counts"
    doubled = await clickhouse.query(
        "SELECT request_id, count() AS n FROM usage_events WHERE request_id IN {ids:Array(String)} "
        "GROUP BY request_id HAVING n > 1", {"ids": ids})
    assert doubled == [], "no request stored twice (read without FINAL)"
