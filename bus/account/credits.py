"""Prepaid credits on the bus: the available balance, holds, settlements and ledger entries.

A prepaid tenant's *available* credits live in one JetStream counter
(``tg.credit.<tenant>``): ledger entries add to it, admission takes a hold out
of it, and the request's usage gives back what the hold did not cost. Every
add carries a message id, so a retried add (a meter redelivered a batch)
lands once within the stream's dedupe window. A hold is ``hold-<request>``;
giving back a refused hold, settling from usage (the meter) and releasing a
hold no usage came for (billing's sweeper) all use ``settle-<request>``, so
only the first of them counts.

Ledger entries (grants, top-ups, refunds, expiries) are published here and
applied to the counter by billing alone; ``credit_ledger`` in ClickHouse holds
them plus one debit per prepaid usage event, so its sum is the balance. An
entry's id is scoped to its tenant (like a Stripe idempotency key to its
account): ``<tenant>/<id>`` names it on the bus, and an operator's id is claimed
for good in ``tg_credit_ids`` before its entry is published (``record_change``).
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from typing import Literal

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from bus.counters import add, read
from bus.envelopes import MSG_ID_HEADER
from bus.errors import Conflict, InvalidRequest
from bus.protocol import CreditEntry, HoldNotice, decode_credit, encode
from bus.settings import Settings
from bus.subjects import CREDIT_IDS_BUCKET, CREDITS_STREAM, credit_counter, credit_event_subject, hold_subject

# What one ledger entry may move (ClickHouse keeps amounts as Int64), and the latest expiry (year 2200).
MAX_MICROS, _LATEST_EXPIRY = 2**62, 7_258_118_400.0
# The most a balance may reach: two changes racing past it still sum inside Int64 (the ledger's sums).
MAX_BALANCE_MICROS = 2**62 - 1
# Ids billing makes itself (``billing.expiry``, the debit view): an operator's id must not take one.
_RESERVED_ID_PREFIXES, _MAX_ID_LENGTH = ("expire-", "debit-"), 256


class CreditChange(msgspec.Struct, forbid_unknown_fields=True):
    """A grant, top-up or refund as an operator asks for it (admin API or CLI)."""

    amount_micros: int
    kind: Literal["grant", "topup", "refund"] = "grant"
    expires_at: float | None = None  # unix seconds; grants only
    expires_in: float | None = None  # seconds from now; grants only
    request_id: str | None = None  # refunds: the request refunded
    note: str = ""
    # Send the same id again to retry a change safely: it is applied once.
    id: str | None = None

    def entry(self, tenant: str, now: float) -> CreditEntry:
        """The ledger entry this change makes, or ``InvalidRequest`` if it makes none."""
        if not 0 < self.amount_micros <= MAX_MICROS:
            raise InvalidRequest(f"amount_micros must be from 1 to {MAX_MICROS}", param="amount_micros")
        if self.expires_at is not None and self.expires_in is not None:
            raise InvalidRequest("set expires_at or expires_in, not both", param="expires_in")
        expires = self.expires_at if self.expires_in is None else now + self.expires_in
        if expires is not None and self.kind != "grant":
            raise InvalidRequest("only grants expire", param="expires_at")
        if expires is not None and not now < expires < _LATEST_EXPIRY:
            raise InvalidRequest("a grant must expire in the future, in unix seconds (not milliseconds)",
                                 param="expires_in" if self.expires_in is not None else "expires_at")
        if self.id is not None and (not 0 < len(self.id) <= _MAX_ID_LENGTH or self.id.startswith(_RESERVED_ID_PREFIXES)):
            raise InvalidRequest(f"id must be 1 to {_MAX_ID_LENGTH} characters and not start with "
                                 f"{' or '.join(_RESERVED_ID_PREFIXES)}", param="id")
        return CreditEntry(
            id=self.id or "cr-" + uuid.uuid4().hex, tenant=tenant, kind=self.kind, amount_micros=self.amount_micros,
            at=now, expires_at=expires, request_id=self.request_id, note=self.note,
        )


async def available(js: JetStreamContext, tenant: str) -> int:
    """Credits the tenant can still hold: its balance less what is held for requests in flight."""
    return await read(js, CREDITS_STREAM, credit_counter(tenant))


async def _add_once(js: JetStreamContext, subject: str, n: int, msg_id: str) -> int | None:
    """``add``, tried again under the same id if the first answer was lost (it lands once either way)."""
    try:
        return await add(js, subject, n, msg_id)
    except Exception:
        return await add(js, subject, n, msg_id)


async def hold(js: JetStreamContext, tenant: str, request_id: str, amount: int) -> bool:
    """Hold ``amount`` for one request; False (and nothing held) when the credits do not cover it."""
    if amount <= 0:
        return True
    subject = credit_counter(tenant)
    total = await _add_once(js, subject, -amount, f"hold-{request_id}")
    if total is None:  # the first try landed but its answer was lost: look at the balance instead
        total = await read(js, CREDITS_STREAM, subject)
    if total >= 0:
        return True
    await _add_once(js, subject, amount, f"settle-{request_id}")
    return False


def settle_window_s(settings: Settings) -> float:
    """How long after a request was created its settlement still lands once, whoever sends it.

    The CREDITS stream drops a repeated ``settle-<request>`` for twice the longest deadline
    after the first; a hold is settled no earlier than its request's creation. Less a margin
    for clocks that disagree.
    """
    return 2 * settings.max_deadline_s - min(60.0, settings.max_deadline_s / 2)


async def settle(js: JetStreamContext, tenant: str, request_id: str, hold_micros: int, cost_micros: int) -> None:
    """Give back what a hold did not cost (all of it when the request never ran), once."""
    await add(js, credit_counter(tenant), hold_micros - cost_micros, f"settle-{request_id}")


def entry_key(tenant: str, entry_id: str) -> str:
    """An entry's name across tenants: tenant ids have no ``/``, so no two tenants' ids meet."""
    return f"{tenant}/{entry_id}"


async def record(js: JetStreamContext, entry: CreditEntry) -> None:
    """Publish a ledger entry; billing applies it to the balance (``billing.ledger``). Safe to retry."""
    await js.publish(credit_event_subject(entry.tenant), encode(entry),
                     headers={MSG_ID_HEADER: entry_key(entry.tenant, entry.id)})


def _same_change(a: CreditEntry, b: CreditEntry) -> bool:
    # Times differ between tries (``at``, an ``expires_in`` worked out again); what moves credits may not.
    return (a.kind, a.amount_micros, a.request_id) == (b.kind, b.amount_micros, b.request_id)


async def record_change(js: JetStreamContext, entry: CreditEntry) -> CreditEntry:
    """Record an operator's change once per tenant and id, and return the entry that stands.

    The id is claimed in ``tg_credit_ids`` (an atomic create, kept for good) before the
    entry is published, so two changes sent under one id cannot both be accepted, however
    far apart: the same change again is a retry (the first entry is published again, which
    billing applies once; it also covers a crash between claim and publish), a different
    one is ``Conflict``.
    """
    kv = await js.key_value(CREDIT_IDS_BUCKET)
    key = f"{entry.tenant}.{hashlib.sha256(entry.id.encode()).hexdigest()}"  # ids may hold any character
    if entry.amount_micros > 0 and await available(js, entry.tenant) + entry.amount_micros > MAX_BALANCE_MICROS:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):  # a retry of a change that stands is answered
            return await _recorded(js, kv, key, entry)
        raise InvalidRequest(f"this change would take the balance past {MAX_BALANCE_MICROS} micro-credits",
                             param="amount_micros")
    try:
        await kv.create(key, encode(entry))
    except nats.js.errors.KeyWrongLastSequenceError:
        return await _recorded(js, kv, key, entry)
    await record(js, entry)
    return entry


async def _recorded(js: JetStreamContext, kv, key: str, entry: CreditEntry) -> CreditEntry:
    """The change first recorded under ``entry``'s id, published again (billing applies it once);
    ``Conflict`` if that id named a different change."""
    first = decode_credit((await kv.get(key)).value)
    if not _same_change(first, entry):
        raise Conflict(f"id {entry.id!r} was already used for a different change to this tenant's credits "
                       f"({first.kind} of {first.amount_micros} micro-credits)", param="id",
                       code="idempotency_key_reused")
    await record(js, first)
    return first


async def report_hold(js: JetStreamContext, notice: HoldNotice) -> None:
    """Tell billing of a hold, so it is released if no usage ever arrives for its request."""
    await js.publish(hold_subject(notice.tenant), encode(notice), headers={MSG_ID_HEADER: notice.request_id})
