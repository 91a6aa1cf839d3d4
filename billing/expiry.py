"""Grants that lapse: what is left of them when they expire leaves the balance.

Spending draws on grants in order of expiry, soonest first (grants that never
expire last), so what a lapsing grant still holds is found by replaying the
tenant's ledger. The lapse is itself a ledger entry (``expire-<grant>-<n>``,
the same id however often it is worked out), applied by the ledger writer.
A request pays from the grants live when it was queued (its debit is dated
then), so a grant lapses only once every hold the tenant took before the
lapse is closed: until then a request may still be paid from it. It never
takes more than is available right now: credits held for requests in flight
stay theirs, and what is left of the grant lapses on a later pass.
"""

from __future__ import annotations

import logging
import math
import time

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from billing.clickhouse import ClickHouse, utc
from billing.meter import Watermark
from bus.account import credits
from bus.protocol import CreditEntry
from bus.subjects import HOLDS_STREAM, hold_subject

log = logging.getLogger(__name__)

# A lapse takes a few passes at most (only while credits are held); a week is plenty.
_LOOK_BACK_S = 7 * 86400


class _Grant:
    __slots__ = ("id", "left", "expires", "order")

    def __init__(self, entry_id: str, amount: int, expires: float | None, order: int):
        self.id, self.left, self.expires, self.order = entry_id, amount, expires, order


def unspent(rows: list[tuple]) -> dict[str, tuple[int, int]]:
    """Replay ledger rows (id, kind, amount, at, expires_at, grant_id) in time order.

    Returns, for each grant, what is left of it and how many expiries it has had.
    """
    grants: dict[str, _Grant] = {}
    expiries: dict[str, int] = {}
    for order, (entry_id, kind, amount, at_time, expires_at, grant_id) in enumerate(rows):
        if amount > 0:  # grants, top-ups and refunds are all money in
            expires = expires_at.timestamp() if expires_at is not None else None
            grants[entry_id] = _Grant(entry_id, amount, expires, order)
        elif kind == "expire" and grant_id in grants:
            grants[grant_id].left += amount
            expiries[grant_id] = expiries.get(grant_id, 0) + 1
        else:
            owed, at = -amount, at_time.timestamp()
            live = [g for g in grants.values() if g.expires is None or g.expires > at]  # a lapsed grant pays nothing
            for grant in sorted(live, key=lambda g: (g.expires if g.expires is not None else math.inf, g.order)):
                take = min(owed, grant.left)
                grant.left, owed = grant.left - take, owed - take
                if not owed:
                    break
    return {g.id: (max(g.left, 0), expiries.get(g.id, 0)) for g in grants.values()}


async def _oldest_open_hold(js: JetStreamContext, tenant: str) -> float | None:
    """When the tenant's oldest hold that is not closed yet was reported; None if none is open."""
    try:
        notice = await js.get_msg(HOLDS_STREAM, seq=1, subject=hold_subject(tenant), next=True)
    except NotFoundError:
        return None
    return notice.time.timestamp()


async def expire_lapsed(js: JetStreamContext, ch: ClickHouse, watermark: Watermark) -> int:
    """Publish an expiry for every recently lapsed grant with credits left; return how many.

    Waits until the meter has stored all usage published before the pass began: a
    debit not yet in the ledger would make a grant look less spent than it is.
    Grants that lapsed more than ``_LOOK_BACK_S`` ago are not looked at again.
    """
    if not await watermark.passed("expiry"):
        return 0
    now = time.time()
    tenants = [t for (t,) in await ch.query(
        "SELECT DISTINCT tenant FROM credit_ledger FINAL WHERE kind = 'grant' "
        "AND expires_at <= {now:DateTime64(6)} AND expires_at > {since:DateTime64(6)}",
        {"now": utc(now), "since": utc(now - _LOOK_BACK_S)},
    )]
    published = 0
    for tenant in tenants:
        rows = await ch.query(
            "SELECT id, kind, amount_micros, at, expires_at, grant_id FROM credit_ledger FINAL "
            "WHERE tenant = {tenant:String} ORDER BY at, id",
            {"tenant": tenant},
        )
        expiring = {r[0]: r[4].timestamp() for r in rows if r[1] == "grant" and r[4] is not None}
        lapsed = [(grant_id, left, done) for grant_id, (left, done) in unspent(rows).items()
                  if grant_id in expiring and expiring[grant_id] <= now and left > 0]
        if not lapsed:  # the usual case once a grant's rest has lapsed: no bus round trips
            continue
        available = await credits.available(js, tenant)
        open_since = await _oldest_open_hold(js, tenant)
        for grant_id, left, done in lapsed:
            if available <= 0 or (open_since is not None and open_since <= expiring[grant_id]):
                continue  # nothing to take now, or a request held before the lapse may still be paid from it
            amount = min(left, available)
            available -= amount
            await credits.record(js, CreditEntry(
                id=f"expire-{grant_id}-{done}", tenant=tenant, kind="expire", amount_micros=-amount, at=now,
                grant_id=grant_id, note="unspent credits of a grant that expired",
            ))
            published += 1
    return published
