"""The billing consumers' batch loop: a failed batch is retried before any later batch is handled."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from billing.batches import Batches
from infra.nats_launcher import NatsServer
from tests.conftest import eventually


async def _numbered(nc, n: int) -> Batches:
    """A stream holding the messages 0..n-1, read ten at a time through an ack-all consumer."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
    await js.add_consumer("T", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.ALL, ack_wait=30))
    for i in range(n):
        await js.publish("t.x", str(i).encode())
    batches = Batches(nc, "T", "c", batch_size=10)
    await batches.start()
    return batches


async def test_a_failed_batch_is_retried_first_and_no_later_ack_covers_it(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        batches = await _numbered(nc, 30)
        handled: list[tuple[list[int], bool]] = []
        failures = 0

        async def handle(msgs, retry):
            nonlocal failures
            numbers = [int(m.data) for m in msgs]
            if numbers[0] == 10 and failures < 2:  # the second batch fails twice
                failures += 1
                raise RuntimeError("ClickHouse is away")
            handled.append((numbers, retry))
            await msgs[-1].ack()

        stop = asyncio.Event()
        loop = asyncio.create_task(batches.run(stop, handle))

        async def all_handled():
            return sum(len(n) for n, _ in handled) == 30

        await eventually(all_handled, timeout=15)
        stop.set()
        await loop
        await batches.close()
        assert [n for n, _ in handled] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
        assert [retry for _, retry in handled] == [False, True, False]
        info = await js.consumer_info("T", "c")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
        await nc.close()


async def test_a_stop_while_a_batch_fails_acks_nothing_after_it(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        batches = await _numbered(nc, 20)
        stop = asyncio.Event()
        handled: list[int] = []

        async def handle(msgs, retry):
            if int(msgs[0].data) == 0:
                stop.set()  # billing is asked to stop while ClickHouse is away
                raise RuntimeError("ClickHouse is away")
            handled.append(int(msgs[0].data))
            await msgs[-1].ack()

        await asyncio.wait_for(batches.run(stop, handle), 10)
        await batches.close()
        assert handled == [], "the batch fetched after the failed one was not handled"
        await nc.flush()
        info = await js.consumer_info("T", "c")
        assert info.ack_floor.stream_seq == 0, "nothing acked: all 20 come back"
        await nc.close()
