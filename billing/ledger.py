"""The credit ledger: entries from ``tg.event.credit.>`` applied to balances and written to ClickHouse.

This consumer is the one place a ledger entry reaches a tenant's available
balance (``bus.credits``): it applies the entry under the message id
``ledger-<id>``, inserts the row if it is new, then acks. A crash anywhere in
between redelivers the entry within ``ack_wait``, well inside the counter's
dedupe window, so the entry lands once in both.
"""

from __future__ import annotations

import logging
from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.batches import Batches, ack_all
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
        entries: dict[str, CreditEntry] = {}
        keep: list[Msg] = []
        for msg in msgs:
            try:
                entry = decode_credit(msg.data)
            except Exception:
                log.error("terminated a malformed ledger entry on %s", msg.subject)
                await msg.term()
                continue
            entries.setdefault(entry.id, entry)
            keep.append(msg)
        for entry in entries.values():
            await add(self._js, credit_counter(entry.tenant), entry.amount_micros, f"ledger-{entry.id}")
        stored = await self.ch.query(
            "SELECT id FROM credit_ledger WHERE id IN {ids:Array(String)}", {"ids": list(entries)}
        )
        known = {entry_id for (entry_id,) in stored}
        new = [_row(e) for e in entries.values() if e.id not in known]
        if new:
            await self.ch.insert("credit_ledger", new, COLUMNS)
        await ack_all(keep)
