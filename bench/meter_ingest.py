"""Metering ingest: usage events from the USAGE stream to ClickHouse rows, and the lag at a steady load.

    .venv/bin/python bench/meter_ingest.py [--events 100000] [--rate 5000] [--batch N]

Phase 1 (throughput): publish --events usage events, then run the meter and time
until every one is a row. Phase 2 (lag): publish at --rate events/s for 10 s while
the meter runs; lag = row's inserted_at - event's finished_at.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from billing.clickhouse import ClickHouse  # noqa: E402
from billing.meter import Meter  # noqa: E402
from billing.schema import apply_schema  # noqa: E402
from bus.envelopes import seal_usage  # noqa: E402
from bus.ids import new_request_id  # noqa: E402
from bus.protocol import Ticket, UsageEvent, encode  # noqa: E402
from bus.settings import Settings  # noqa: E402
from infra.bootstrap import Bootstrapped, bootstrap  # noqa: E402
from infra.nats_launcher import NatsServer  # noqa: E402


def event(tenant: str) -> UsageEvent:
    now = time.time()
    return UsageEvent(request_id=new_request_id(), tenant=tenant, principal="k", model="m", kind="chat",
                      lane="normal", queued_at=now, started_at=now, first_token_at=now, finished_at=now,
                      input_units=30, output_units=20, unit="tokens", cost_micros=0, status="ok",
                      cache_hit=False, worker_id="w")


def sealed(e: UsageEvent, signers: Bootstrapped) -> tuple[bytes, dict[str, str]]:
    """The event as a worker reports it: bound to a ticket the edge signed, signed by the worker."""
    ticket = Ticket(e.request_id, e.tenant, e.principal, signers.edge.public_key, e.kind, e.model, e.lane,
                    e.queued_at, e.queued_at + 60, e.hold_micros)
    return seal_usage(e, ticket, signers.edge.sign(encode(ticket)), signers.worker)


async def publish(js, signers: Bootstrapped, n: int, tenant: str, rate: float | None = None) -> None:
    start = time.perf_counter()
    pending = []
    for i in range(n):
        data, headers = sealed(event(tenant), signers)
        # Sent now (a task), so an event's finished_at is its publish time, as a worker's is.
        pending.append(asyncio.ensure_future(js.publish(f"tg.usage.{tenant}", data, headers=headers)))
        if len(pending) == 500:
            await asyncio.gather(*pending)
            pending = []
        if rate:
            delay = start + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    await asyncio.gather(*pending)


async def rows(ch: ClickHouse, tenant: str) -> int:
    return (await ch.query("SELECT count() FROM usage_events WHERE tenant = {t:String}", {"t": tenant}))[0][0]


async def main(events: int, rate: float, batch: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-meter-bench-"))
    settings = msgspec.structs.replace(Settings(), state_dir=str(tmp))
    settings.meter.batch_size = batch
    with NatsServer(tmp / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        signers = await bootstrap(js, settings)
        ch = await asyncio.to_thread(ClickHouse, settings.clickhouse)
        await apply_schema(ch)

        await publish(js, signers, events, "burst")
        meter = Meter(settings, nc, ch)
        await meter.start()
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(meter.run(stop, meter.handle))
        while await rows(ch, "burst") < events:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        print(f"throughput: {events} events in {elapsed:.2f} s = {events / elapsed:,.0f} events/s "
              f"(batch size {settings.meter.batch_size})")

        await publish(js, signers, int(rate * 10), "steady", rate=rate)
        while await rows(ch, "steady") < int(rate * 10):
            await asyncio.sleep(0.05)
        [(p50, p99, worst)] = await ch.query(
            "SELECT quantile(0.5)(lag), quantile(0.99)(lag), max(lag) FROM (SELECT "
            "(toUnixTimestamp64Micro(inserted_at) - toUnixTimestamp64Micro(finished_at)) / 1e6 AS lag "
            "FROM usage_events WHERE tenant = 'steady')"
        )
        print(f"lag at {rate:,.0f} events/s for 10 s: p50 {p50:.3f} s, p99 {p99:.3f} s, max {worst:.3f} s")
        stop.set()
        await task
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=5_000)
    parser.add_argument("--batch", type=int, default=Settings().meter.batch_size, help="meter.batch_size")
    args = parser.parse_args()
    uvloop.install()
    asyncio.run(main(args.events, args.rate, args.batch))
