"""The metering consumer: USAGE stream -> ClickHouse ``usage_events``, exactly one row per request.

A batch is acked only after its insert returns and its credit holds are
settled. If the meter dies in between, the batch is redelivered: ids already
stored are skipped, so the table never holds a request twice, and a
settlement carries the request's message id, so it lands once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from billing.batches import Batches, delivery
from billing.clickhouse import ClickHouse
from bus import credits
from bus.protocol import UsageEvent, decode_usage
from bus.provision import ensure_meter_consumer
from bus.settings import Settings
from bus.subjects import METER_CONSUMER, USAGE_STREAM

log = logging.getLogger(__name__)

COLUMNS = UsageEvent.__struct_fields__  # the table's columns are the event's fields, in order
_TIME_COLUMNS = [i for i, name in enumerate(COLUMNS) if name.endswith("_at")]


def columns(events: list[UsageEvent]) -> list[list]:
    """The events as one list per column, the layout ClickHouse inserts fastest.

    Times go as integer microseconds, which a DateTime64(6) column takes as they are.
    """
    cols = list(map(list, zip(*map(msgspec.structs.astuple, events))))
    for i in _TIME_COLUMNS:
        cols[i] = [None if ts is None else round(ts * 1_000_000) for ts in cols[i]]
    return cols


class Watermark:
    """Tells when the meter has stored every usage event published up to a moment.

    ``passed(key)`` marks the USAGE stream's end on its first call for ``key`` and is
    true once the meter's ack floor reaches that mark: under steady traffic the meter
    is never idle, but it does get past any given point.
    """

    def __init__(self, js: JetStreamContext):
        self._js = js
        self._marks: dict[str, int] = {}

    async def passed(self, key: str) -> bool:
        mark = self._marks.get(key)
        if mark is None:
            mark = self._marks[key] = (await self._js.stream_info(USAGE_STREAM)).state.last_seq
        floor = (await self._js.consumer_info(USAGE_STREAM, METER_CONSUMER)).ack_floor.stream_seq
        if floor < mark:
            return False
        del self._marks[key]
        return True

    def forget(self, key: str) -> None:
        self._marks.pop(key, None)


class Meter(Batches):
    def __init__(self, settings: Settings, nc: Client, ch: ClickHouse,
                 on_stored: Callable[[set[str]], None] | None = None):
        super().__init__(nc, USAGE_STREAM, METER_CONSUMER, settings.meter.batch_size)
        self.settings = settings
        self.ch = ch
        self._on_stored = on_stored  # told which tenants' usage changed (budgets follow it)
        self._recheck_through = 0

    async def start(self) -> None:
        # Events up to this stream position may have been stored by a meter whose consumer was replaced.
        self._recheck_through = await ensure_meter_consumer(self._js, self.settings)
        await super().start()

    async def store(self, msgs: list[Msg], retry: bool = False) -> list[Msg]:
        """Insert the batch's new events and settle its holds; return the messages that may now be acked.

        Malformed events are terminated and logged, never inserted. ``retry``: the
        batch was handled before and may be stored already, so every id is looked up.
        """
        events: dict[str, UsageEvent] = {}
        redelivered: list[UsageEvent] = []
        keep: list[Msg] = []
        for msg in msgs:
            try:
                event = decode_usage(msg.data)
            except Exception:
                log.error("terminated a malformed usage event on %s", msg.subject)
                await msg.term()
                continue
            events.setdefault(event.request_id, event)
            keep.append(msg)
            delivered, seq = delivery(msg)
            if retry or delivered > 1 or seq <= self._recheck_through:
                redelivered.append(event)
        if not events:
            return keep
        # Only a redelivered event can be stored already: the stream itself drops a republished
        # one (same Nats-Msg-Id) inside its dedupe window, so first deliveries skip the lookup.
        known = set()
        if redelivered:
            stored = await self.ch.query(
                "SELECT request_id FROM usage_events WHERE tenant IN {tenants:Array(String)} "
                "AND request_id IN {ids:Array(String)}",
                {"tenants": sorted({e.tenant for e in redelivered}), "ids": [e.request_id for e in redelivered]},
            )
            known = {request_id for (request_id,) in stored}
        new = [e for request_id, e in events.items() if request_id not in known]
        if new:
            await self.ch.insert_columns("usage_events", columns(new), COLUMNS)
        # Settled for stored and new alike: a redelivered batch may have died before settling.
        await asyncio.gather(*(
            credits.settle(self._js, e.tenant, e.request_id, e.hold_micros, e.cost_micros)
            for e in events.values() if e.hold_micros > 0
        ))
        if new and self._on_stored is not None:
            self._on_stored({e.tenant for e in new})
        return keep

    async def ack(self, msgs: list[Msg]) -> None:
        if msgs:
            await msgs[-1].ack()  # ack-all: acks the whole batch, and everything delivered before it

    async def handle(self, msgs: list[Msg], retry: bool = False) -> None:
        await self.ack(await self.store(msgs, retry))
