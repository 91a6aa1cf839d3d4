"""The billing process: metering, the credit ledger, holds, budgets, alert webhooks and usage queries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from nats.aio.client import Client

from billing import metrics
from billing.budgets import BudgetTracker
from billing.clickhouse import ClickHouse
from billing.expiry import expire_lapsed
from billing.holds import HoldSweeper
from billing.ledger import LedgerWriter
from billing.meter import Meter, Watermark
from billing.schema import apply_schema
from billing.usage_service import UsageService
from billing.webhooks import WebhookSender
from bus import tracing
from bus.connect import connect
from bus.heap import settle_heap
from bus.metrics import serve_metrics
from bus.provision import ensure_billing_consumers
from bus.settings import Settings

log = logging.getLogger(__name__)


class Billing:
    """Every billing consumer over one NATS connection (usage queries over their FastStream broker's) and one
    ClickHouse engine."""

    def __init__(self, settings: Settings, nc: Client, ch: ClickHouse):
        js = nc.jetstream()
        self.settings, self.js = settings, js
        self.budgets = BudgetTracker(js, ch, late_s=settings.max_deadline_s + settings.meter.hold_grace_s)
        self.meter = Meter(settings, nc, ch, on_stored=self.budgets.touch)
        self.watermark = Watermark(js)
        self.ledger = LedgerWriter(settings, nc, ch)
        self.holds = HoldSweeper(settings, nc, ch)
        self.webhooks = WebhookSender(settings, nc)
        self.usage = UsageService(settings.nats, ch)  # FastStream, on a connection of its own
        self._consumers = (self.meter, self.ledger, self.holds, self.webhooks)
        self.ch = ch
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await ensure_billing_consumers(self.js, self.settings)
        await self.budgets.start()
        for part in (*self._consumers, self.usage):
            await part.start()
        self._stop = asyncio.Event()
        self._tasks = [
            *(asyncio.create_task(part.run(self._stop, part.handle)) for part in self._consumers),
            asyncio.create_task(self.budgets.run(self._stop)),
            asyncio.create_task(self._chores()),
        ]

    async def _chores(self) -> None:
        """Lapse expired grants and follow budgets into new periods, on a timer."""
        while not self._stop.is_set():
            for chore in (lambda: expire_lapsed(self.js, self.ch, self.watermark), self.budgets.refresh):
                try:
                    await chore()
                except Exception:
                    log.exception("a periodic billing chore failed; it runs again next interval")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.meter.expiry_interval_s)

    async def stop(self) -> None:
        self._stop.set()
        for result in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("a billing task had failed: %r", result)
        await self.usage.stop()
        for part in self._consumers:
            await part.close()
        await self.budgets.stop()


async def serve_billing(settings: Settings) -> None:
    """Apply the schema, then run billing until SIGINT or SIGTERM."""
    ch = await asyncio.to_thread(ClickHouse, settings.clickhouse)
    await apply_schema(ch)
    nc = await connect(settings.nats, "tollgate-billing")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tracing.install(settings.tracing, "billing")
    try:
        await _serve(settings, nc, ch, stop)
    finally:
        await asyncio.to_thread(tracing.uninstall)  # the last spans sent, however billing ended


async def _serve(settings: Settings, nc, ch: ClickHouse, stop: asyncio.Event) -> None:
    billing = Billing(settings, nc, ch)
    await billing.start()
    settle_heap()  # the engine, the connection and the consumers live as long as billing: never scanned again
    exposed = await serve_metrics(settings.processes.metrics_host, settings.meter.metrics_port,
                                  metrics.collector(billing.js))
    try:
        await stop.wait()
    finally:
        if exposed is not None:
            await exposed.cleanup()
        await billing.stop()
        await nc.drain()
        ch.close()
