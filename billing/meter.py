"""The metering consumer: USAGE stream -> ClickHouse ``usage_events``, exactly one row per request.

Each event is acked on its own (explicit acks), and only after its insert
returned and its credit hold was settled: an ack never covers an event this
meter did not store, so a meter that dies mid-batch — or a second meter
beside it — cannot acknowledge past usage that is not stored. A redelivered
event whose id is stored already is skipped, so the table never holds a
request twice, and a settlement carries the request's message id, so it
lands once.

Nothing is stored that is not bound to an admitted request (``bus.envelopes.
open_usage``). What cannot be stored — a report that fails those checks, or an
event ClickHouse refuses ``store_attempts`` times — is moved to the
dead-letter stream with the reason, and everything behind it flows on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from billing.batches import Batches, ack_each, delivery
from billing import metrics
from billing.clickhouse import ClickHouse
from bus import tracing
from bus.dead_letters import dead_letter
from bus.account import credits
from bus.envelopes import open_usage
from bus.errors import BadUsage
from bus.issuers import watch_issuers
from bus.protocol import UsageEvent
from bus.provision import ensure_meter_consumer
from bus.settings import Settings
from bus.subjects import METER_CONSUMER, USAGE_STREAM

log = logging.getLogger(__name__)

COLUMNS = UsageEvent.__struct_fields__  # the table's columns are the event's fields, in order
_TIME_COLUMNS = [i for i, name in enumerate(COLUMNS) if name.endswith("_at")]
# Stamped by the meter, once a batch, so the meter and the sweeper judge "stored late" alike.
_INSERT_COLUMNS = (*COLUMNS, "inserted_at")
# A forgotten refusal only delays that event's dead-lettering by one more round.
_REFUSALS_KEPT = 10_000
_REFUSED_RETRY_S = 5.0  # how long a refused event not yet proven bad waits before it is tried again


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
        super().__init__(nc, USAGE_STREAM, METER_CONSUMER, settings.meter.batch_size,
                         settings.meter.min_insert_interval_s)
        self.settings = settings
        self.ch = ch
        self._on_stored = on_stored  # told which tenants' usage changed (budgets follow it)
        self._recheck_through = 0
        self._failures = 0  # consecutive failed tries of the batch in hand
        self._last_insert = 0.0  # monotonic time of the last insert ClickHouse took
        # Lone events ClickHouse refused, by request id: when first refused (bounded, oldest dropped).
        self._refusals: dict[str, float] = {}

    async def start(self) -> None:
        # Events up to this stream position may have been stored by a meter whose consumer was replaced.
        self._recheck_through = await ensure_meter_consumer(self._js, self.settings)
        self._issuers = await watch_issuers(self._js)
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self._issuers.stop()

    async def store(self, msgs: list[Msg], retry: bool = False) -> list[Msg]:
        """Insert the batch's new events and settle their holds; return the messages that may now be acked.

        A report that fails its checks is dead-lettered, never inserted. ``retry``: the
        batch was handled before and may be stored already, so every id is looked up.
        """
        if not retry:
            self._failures = 0  # a new batch: its tries are counted afresh
        events: dict[str, UsageEvent] = {}
        by_id: dict[str, list[Msg]] = {}
        redelivered: list[UsageEvent] = []
        now = time.time()
        # A first delivery is looked up too if its request is older than the USAGE dedupe
        # window: the stream would no longer drop a copy published again.
        dedupe_after = now - 2 * self.settings.max_deadline_s + 60
        for msg in msgs:
            try:
                event = open_usage(msg.data, msg.headers, self._issuers.get, self.settings.max_deadline_s)
            except BadUsage as exc:
                await dead_letter(self._js, msg, "usage", str(exc))
                continue
            events.setdefault(event.request_id, event)
            by_id.setdefault(event.request_id, []).append(msg)
            delivered, seq = delivery(msg)
            if retry or delivered > 1 or seq <= self._recheck_through or event.queued_at < dedupe_after:
                redelivered.append(event)
        if not events:
            return []
        # Only those can be stored already: inside its dedupe window the stream itself drops a
        # republished event (same Nats-Msg-Id), so other first deliveries skip the lookup.
        inserted_at: dict[str, float] = {}
        if redelivered:
            stored = await self.ch.query(
                "SELECT request_id, toUnixTimestamp64Micro(inserted_at) FROM usage_events "
                "WHERE tenant IN {tenants:Array(String)} AND request_id IN {ids:Array(String)}",
                {"tenants": sorted({e.tenant for e in redelivered}), "ids": [e.request_id for e in redelivered]},
            )
            inserted_at = {request_id: micros / 1e6 for request_id, micros in stored}
        new = [e for request_id, e in events.items() if request_id not in inserted_at]
        if new:
            new = await self._insert(new, by_id, now)
            inserted_at.update((e.request_id, now) for e in new)
        # Settled for stored and new alike (a redelivered batch may have died before settling), but
        # only if stored inside the counter's dedupe window after the request was queued: past it a
        # settlement could count twice, and billing's sweeper settles it once, from its hold notice,
        # by the same test on the same stored ``inserted_at``.
        window = credits.settle_window_s(self.settings)
        await asyncio.gather(*(
            credits.settle(self._js, e.tenant, e.request_id, e.hold_micros, e.cost_micros)
            for e in events.values()
            if e.hold_micros > 0 and e.request_id in inserted_at and inserted_at[e.request_id] - e.queued_at < window
        ))
        if new and self._on_stored is not None:
            self._on_stored({e.tenant for e in new})
        return [msg for request_id in events if request_id in by_id for msg in by_id[request_id]]

    async def _insert(self, new: list[UsageEvent], by_id: dict[str, list[Msg]], now: float) -> list[UsageEvent]:
        """Insert ``new`` stamped ``now``; after ``store_attempts`` failed tries of this batch, one by one.

        One by one, an event ClickHouse refuses while others of the batch go in is dead-lettered once
        proven bad (below; its messages leave ``by_id``); if none goes in, ClickHouse may be refusing everything —
        an outage, not a bad event — and the batch is tried again later, dead-lettering nothing.
        An event is proven bad only when ClickHouse refuses it again after taking another insert
        since its previous refusal; one not proven yet (refused once, alone in its batch, or just
        before an outage ended) is put back for later, so what is behind it flows on. Returns what
        was stored.
        """
        stamp = [round(now * 1_000_000)]
        began = time.monotonic()
        try:
            await self.ch.insert_columns("usage_events", [*columns(new), stamp * len(new)], _INSERT_COLUMNS)
            self._inserted(new, began, by_id)
            return new
        except Exception:
            metrics.refused(time.monotonic() - began)
            self._failures += 1
            if self._failures < self.settings.meter.store_attempts:
                raise
        stored, refused = [], []
        for event in new:
            try:
                began = time.monotonic()
                await self.ch.insert_columns("usage_events", [*columns([event]), stamp], _INSERT_COLUMNS)
                stored.append(event)
                self._inserted([event], began, by_id)
            except Exception as exc:
                refused.append((event, exc, self._refused_again(event.request_id)))
        if not stored and len(new) > 1:
            raise RuntimeError(f"ClickHouse refused every one of {len(new)} events: {refused[0][1]}")
        for event, exc, proven in refused:
            msgs = by_id.pop(event.request_id)
            if not proven:
                log.warning("ClickHouse refused usage %s (%s); trying it again later", event.request_id, exc)
                for msg in msgs:
                    await msg.nak(delay=_REFUSED_RETRY_S)
                continue
            del self._refusals[event.request_id]
            for msg in msgs:
                await dead_letter(self._js, msg, "usage", f"ClickHouse refused it: {exc}")
        return stored

    def _inserted(self, events: list[UsageEvent], began: float, by_id: dict[str, list[Msg]]) -> None:
        """Note an insert ClickHouse took, begun at monotonic ``began``: its metrics, and a store span
        (if spans are on) in the trace of each event whose report carried its request's traceparent."""
        self._last_insert = time.monotonic()
        now = time.time()
        metrics.inserted(events, self._last_insert - began, now)
        tracing.record("tollgate.store", now - (self._last_insert - began), now,
                       parents=(tracing.sent_in(by_id[e.request_id][0].headers, e.trace_id) for e in events),
                       attributes={"tollgate.batch_size": len(events)})

    def _refused_again(self, request_id: str) -> bool:
        """Note a refusal of ``request_id`` now; whether ClickHouse took another insert since its last one.

        Refusals are remembered by request id, the oldest forgotten past the bound (a forgotten
        one only costs its event another round)."""
        last = self._refusals.pop(request_id, None)
        if len(self._refusals) >= _REFUSALS_KEPT:
            del self._refusals[next(iter(self._refusals))]
        self._refusals[request_id] = time.monotonic()
        return last is not None and self._last_insert > last

    async def handle(self, msgs: list[Msg], retry: bool = False) -> None:
        await ack_each(await self.store(msgs, retry))
        self._failures = 0
