"""The credit ledger: entries from ``tg.event.credit.>`` applied to balances and written to ClickHouse.

This consumer is the one place a ledger entry reaches a tenant's available
balance (``bus.account.credits``): an entry whose id is not in that tenant's
``credit_ledger`` rows yet is applied under the message id
``ledger-<tenant>/<id>``, its row is inserted, then it is acked. A crash in
between redelivers the entry within ``ack_wait``, well inside the counter's
dedupe window, so the entry lands once in both; an id sent again later finds its
row and changes nothing. Ids are per tenant: another tenant's entry under the
same id is its own. An id reused for a different change (the admin API refuses
that with a 409; only a publish straight onto the bus gets here) is dropped and
logged: the first change under an id stands.
"""

from __future__ import annotations

import logging
from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.batches import Batches, ack_each
from billing.clickhouse import ClickHouse, utc
from bus.counters import add
from bus.account.credits import entry_key
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
        entries: dict[tuple[str, str], tuple[CreditEntry, list]] = {}  # by (tenant, id)
        keep: list[Msg] = []
        for msg in msgs:
            try:
                entry = decode_credit(msg.data)
                row = _row(entry)
            except Exception:
                log.error("terminated a malformed ledger entry on %s", msg.subject)
                await msg.term()
                continue
            entries.setdefault((entry.tenant, entry.id), (entry, row))
            keep.append(msg)
        if entries:
            # An entry already in the ledger was applied before its row was written: never again,
            # even when its id comes back long after the counter's dedupe window.
            stored = await self.ch.query(
                "SELECT tenant, id, kind, amount_micros FROM credit_ledger "
                "WHERE tenant IN {tenants:Array(String)} AND id IN {ids:Array(String)}",
                {"tenants": list({t for t, _ in entries}), "ids": list({i for _, i in entries})})
            for tenant, entry_id, kind, amount in stored:
                found = entries.pop((tenant, entry_id), None)  # the query also matches other pairs
                if found and (found[0].kind, found[0].amount_micros) != (kind, amount):
                    log.error("dropped a ledger entry for %s reusing id %r for a different change "
                              "(%s %d; the ledger has %s %d)", tenant, entry_id, found[0].kind,
                              found[0].amount_micros, kind, amount)
            for entry, _ in entries.values():
                await add(self._js, credit_counter(entry.tenant), entry.amount_micros,
                          "ledger-" + entry_key(entry.tenant, entry.id))
            if entries:
                await self.ch.insert("credit_ledger", [row for _, row in entries.values()], COLUMNS)
        await ack_each(keep)
