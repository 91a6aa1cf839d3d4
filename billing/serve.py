"""The metering process entry point."""

from __future__ import annotations

import asyncio
import signal


from billing.clickhouse import ClickHouse
from billing.meter import Meter
from billing.schema import apply_schema
from billing.usage_service import UsageService
from bus.connect import connect
from bus.settings import Settings


async def serve_meter(settings: Settings) -> None:
    """Apply the schema, then meter usage into ClickHouse and answer usage queries until SIGINT or SIGTERM."""
    ch = await asyncio.to_thread(ClickHouse, settings.clickhouse)
    await apply_schema(ch)
    nc = await connect(settings.nats, "tollgate-meter")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    meter = Meter(settings, nc, ch)
    await meter.start()
    usage = UsageService(nc, ch)
    await usage.start()
    try:
        await meter.run(stop)
    finally:
        await usage.stop()
        await meter.close()
        await nc.drain()
        ch.close()
