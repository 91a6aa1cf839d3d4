"""The credit ledger: entries from ``tg.event.credit.>`` applied to balances and written to ClickHouse.

This consumer is the one place a ledger entry reaches a tenant's available
balance (``bus.credits``): an entry whose id is not in ``credit_ledger`` yet is
applied under the message id ``ledger-<id>``, its row is inserted, then it is
acked. A crash in between redelivers the entry within ``ack_wait``, well
inside the counter's dedupe window, so the entry lands once in both; an id
sent again later finds its row and changes nothing.
"""

from __future__ import annotations

import logging
from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.batches import Batches, ack_each
from billing.clickhouse import ClickHouse, utc
from bus.counters import add
from bus.protocol import CreditEntry, decode_credit
from bus.settings import Settings
from bus.subjects import EVENTS_STREAM, LEDGER_CONSUMER, credit_counter

log = logging.getLogger(__name__)

COLUMNS = ("id", "tenant", "kind", "amount_micros", "at", "expires_at", "grant_id", "request_id", "note")


def _row(entry: CreditEntry) -> list:
    return [entry.id, entry.tenant, entry.kind, entry.amount_micros, utc(entry.at), utc(entry.expires_at),
            entry.grant_id, entry.request_id, entry.note]


class LedgerWriter(Batches):
    def __init__(self, settings: Settings, nc: Client, ch: ClickHouse):
        super().__init__(nc, EVENTS_STREAM, LEDGER_CONSUMER, settings.meter.batch_size)
        self.ch = ch

    async def handle(self, msgs: list[Msg], retry: bool = False) -> None:
        entries: dict[str, tuple[CreditEntry, list]] = {}
        keep: list[Msg] = []
        for msg in msgs:
            try:
                entry = decode_credit(msg.data)
                row = _row(entry)
            except Exception:
                log.error("terminated a malformed ledger entry on %s", msg.subject)
                await msg.term()
                continue
            entries.setdefault(entry.id, (entry, row))
            keep.append(msg)
        if entries:
            # An entry already in the ledger was applied before its row was written: never again,
            # even when its id comes back long after the counter's dedupe window.
            stored = await self.ch.query("SELECT id FROM credit_ledger WHERE id IN {ids:Array(String)}",
                                         {"ids": list(entries)})
            for (entry_id,) in stored:
                entries.pop(entry_id)
            for entry, _ in entries.values():
                await add(self._js, credit_counter(entry.tenant), entry.amount_micros, f"ledger-{entry.id}")
            if entries:
                await self.ch.insert("credit_ledger", [row for _, row in entries.values()], COLUMNS)
        await ack_each(keep)
