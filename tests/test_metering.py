"""The meter writes exactly one ClickHouse row per request, through crashes and redeliveries."""

from __future__ import annotations

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from bus.protocol import UsageEvent
from bus.provision import ensure_meter_consumer, provision
from bus.settings import Settings
from bus.subjects import METER_CONSUMER, USAGE_STREAM, usage_subject
from infra.nats_launcher import NatsServer
from tests.conftest import UsageSigner, eventually, meter_dies_before_acking, publish_usage, usage_event, usage_rows


def _event(i: int) -> UsageEvent:
    return usage_event(input_units=10 + i, output_units=i)


async def test_crash_between_insert_and_ack_leaves_no_duplicate(stack, nc, meter, clickhouse):
    js = nc.jetstream()
    events = [_event(i) for i in range(20)]
    await meter_dies_before_acking(meter, js, events)  # inserted, never acked

    ids = [e.request_id for e in events]
    assert len(await usage_rows(clickhouse, ids, expect=len(ids))) == len(ids)

    await meter.start()  # the batch is redelivered after ack_wait

    async def all_acked():
        info = await js.consumer_info(USAGE_STREAM, METER_CONSUMER)
        redelivered = info.delivered.consumer_seq > info.delivered.stream_seq
        return info.num_ack_pending == 0 and info.num_pending == 0 and redelivered

    await eventually(all_acked, timeout=15)
    rows = await usage_rows(clickhouse, ids, expect=len(ids))
    assert sorted(r["request_id"] for r in rows) == sorted(ids), "each request exactly once"
    assert {r["request_id"]: r["input_units"] for r in rows} == {e.request_id: e.input_units for e in events}


async def test_republished_usage_is_dropped_by_the_server(nc, meter, clickhouse):
    js = nc.jetstream()
    event = _event(1)
    data, headers = UsageSigner.current.seal(event)
    first = await js.publish(usage_subject(event.tenant), data, headers=headers)
    again = await js.publish(usage_subject(event.tenant), data, headers=headers)
    assert not first.duplicate and again.duplicate
    assert len(await usage_rows(clickhouse, [event.request_id], expect=1)) == 1


async def test_times_and_missing_first_token_are_stored_exactly(nc, meter, clickhouse):
    queued = 1_763_800_000.123456
    event = usage_event(queued_at=queued, started_at=queued + 0.5, first_token_at=None, finished_at=queued + 2.25)
    await publish_usage(nc.jetstream(), [event])
    await usage_rows(clickhouse, [event.request_id], expect=1)
    [(q, s, f, d)] = await clickhouse.query(
        "SELECT toUnixTimestamp64Micro(queued_at), toUnixTimestamp64Micro(started_at), first_token_at, "
        "toUnixTimestamp64Micro(finished_at) FROM usage_events WHERE request_id = {id:String}", {"id": event.request_id})
    assert (q, s, f, d) == (1_763_800_000_123_456, 1_763_800_000_623_456, None, 1_763_800_002_373_456)


async def test_an_older_ack_all_meter_consumer_becomes_explicit_and_resumes_after_its_last_ack(stack, tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        conn = await nats.connect(server.url)
        js = conn.jetstream()
        settings = Settings()
        await provision(js, settings)
        # What the previous version made: one ack per batch (ack-all).
        await js.delete_consumer(USAGE_STREAM, METER_CONSUMER)
        await js.add_consumer(USAGE_STREAM, ConsumerConfig(durable_name=METER_CONSUMER, filter_subject="tg.usage.>",
                                                           ack_policy=AckPolicy.ALL))
        events = [_event(i) for i in range(5)]
        await publish_usage(js, events)
        old = await js.pull_subscribe_bind(METER_CONSUMER, USAGE_STREAM)
        await (await old.fetch(2))[-1].ack()  # acks the first two
        await old.unsubscribe()

        async def acks_recorded():
            return (await js.consumer_info(USAGE_STREAM, METER_CONSUMER)).ack_floor.stream_seq == 2

        await eventually(acks_recorded)  # the server applies acks asynchronously

        await ensure_meter_consumer(js, settings)
        info = await js.consumer_info(USAGE_STREAM, METER_CONSUMER)
        assert info.config.ack_policy == AckPolicy.EXPLICIT
        assert info.num_pending == 3, "the three events never acked, and only those, survived the change"
        await ensure_meter_consumer(js, settings)  # and provisioning again changes nothing
        assert (await js.consumer_info(USAGE_STREAM, METER_CONSUMER)).num_pending == 3
        await conn.close()
