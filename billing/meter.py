"""The metering consumer: USAGE stream -> ClickHouse ``usage_events``, exactly one row per request.

A batch is acked only after its insert returns. If the meter dies between
the two, the batch is redelivered; ids already stored are skipped, so the
table never holds a request twice. One meter owns an embedded chDB path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timezone

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.clickhouse import ClickHouse
from bus.protocol import UsageEvent, decode_usage
from bus.provision import ensure_meter_consumer
from bus.settings import Settings
from bus.subjects import METER_CONSUMER, USAGE_STREAM

log = logging.getLogger(__name__)

COLUMNS = (
    "request_id", "tenant", "principal", "model", "kind", "lane", "queued_at", "started_at",
    "first_token_at", "finished_at", "input_units", "output_units", "unit", "cost_micros",
    "status", "cache_hit", "worker_id", "error_code",
)
_TIMES = {"queued_at", "started_at", "first_token_at", "finished_at"}


def _row(event: UsageEvent) -> list:
    return [
        datetime.fromtimestamp(v, timezone.utc) if name in _TIMES and v is not None else v
        for name, v in ((c, getattr(event, c)) for c in COLUMNS)
    ]


class Meter:
    def __init__(self, settings: Settings, nc: Client, ch: ClickHouse):
        self.settings = settings
        self.nc = nc
        self.ch = ch
        self._sub = None

    async def start(self) -> None:
        js = self.nc.jetstream()
        await ensure_meter_consumer(js, self.settings)
        self._sub = await js.pull_subscribe_bind(METER_CONSUMER, USAGE_STREAM)

    async def fetch(self, timeout: float = 1.0) -> list[Msg]:
        """Up to one batch of usage messages; empty if none came within ``timeout``."""
        try:
            return await self._sub.fetch(self.settings.meter.batch_size, timeout=timeout)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []

    async def store(self, msgs: list[Msg]) -> list[Msg]:
        """Insert the batch's new events; return the messages that may now be acked.

        Malformed events are terminated and logged, never inserted.
        """
        events: dict[str, UsageEvent] = {}
        rows: dict[str, list] = {}
        keep: list[Msg] = []
        for msg in msgs:
            try:
                event = decode_usage(msg.data)
                row = _row(event)
            except Exception:
                log.error("terminated a malformed usage event on %s", msg.subject)
                await msg.term()
                continue
            events.setdefault(event.request_id, event)
            rows.setdefault(event.request_id, row)
            keep.append(msg)
        if events:
            stored = await self.ch.query(
                "SELECT request_id FROM usage_events WHERE tenant IN {tenants:Array(String)} "
                "AND request_id IN {ids:Array(String)}",
                {"tenants": sorted({e.tenant for e in events.values()}), "ids": list(events)},
            )
            for (request_id,) in stored:
                events.pop(request_id, None)
        if events:
            await self.ch.insert("usage_events", [rows[request_id] for request_id in events], COLUMNS)
        return keep

    async def ack(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await msg.ack()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch, store, ack until ``stop`` is set."""
        while not stop.is_set():
            msgs = await self.fetch()
            if not msgs:
                continue
            try:
                await self.ack(await self.store(msgs))
            except Exception:
                # Unacked, the batch comes back after ack_wait: nothing is lost while ClickHouse is away.
                log.exception("could not store a batch of %d usage events; it will be redelivered", len(msgs))
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
